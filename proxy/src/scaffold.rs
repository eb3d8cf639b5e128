//! `wasp filter new NAME`: a new filter crate from `examples/filter-template`.
//!
//! The template is compiled into the binary, so scaffolding works wherever
//! `wasp` is installed. The crate depends on `wasp-sdk` by path: by default
//! the SDK of the source tree this binary was built from, else `--sdk`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const FILES: [(&str, &str); 4] = [
    (
        "Cargo.toml",
        include_str!("../../examples/filter-template/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../examples/filter-template/src/lib.rs"),
    ),
    (
        "README.md",
        include_str!("../../examples/filter-template/README.md"),
    ),
    (
        ".gitignore",
        include_str!("../../examples/filter-template/.gitignore"),
    ),
];

/// Where this binary's own SDK sources were at build time.
const BUILT_WITH_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk");

pub fn new_filter(name: &str, dir: Option<&Path>, sdk: Option<&Path>) -> ExitCode {
    match scaffold(name, dir, sdk) {
        Ok(path) => {
            println!("created filter crate {name} in {}", path.display());
            println!(
                "next: cd {} && cargo build --target wasm32-wasip1 --release",
                path.display()
            );
            println!(
                "then copy target/wasm32-wasip1/release/{}.wasm into your filters_dir",
                name.replace('-', "_")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn scaffold(name: &str, dir: Option<&Path>, sdk: Option<&Path>) -> Result<PathBuf, String> {
    let valid = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        return Err(format!(
            "\"{name}\" is not a usable crate name: use lowercase letters, digits, '-' and '_', starting with a letter"
        ));
    }
    let target = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    if target.exists()
        && target
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(format!(
            "{} already exists and is not empty",
            target.display()
        ));
    }
    let sdk = match sdk {
        Some(p) => p.to_path_buf(),
        None => PathBuf::from(BUILT_WITH_SDK),
    };
    let sdk = sdk.canonicalize().map_err(|_| {
        format!(
            "cannot find wasp-sdk at {}: pass --sdk PATH (the sdk/ folder of a wasp checkout)",
            sdk.display()
        )
    })?;
    let crate_name = name.replace('-', "_");
    for (file, text) in FILES {
        let text = text
            .replace("{{name}}", name)
            .replace("{{crate_name}}", &crate_name)
            .replace("{{sdk_path}}", &sdk.display().to_string());
        let path = target.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(target)
}
