//! The `wasp` binary: see [`wasp::cli`].

fn main() -> std::process::ExitCode {
    wasp::cli::main()
}
