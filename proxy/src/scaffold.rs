//! `wasp filter new NAME`: a new filter crate from `examples/filter-template`,
//! with a `filter-test.toml` fixture file for `wasp filter test`.
//! `wasp filter new DIR`, DIR being an existing filter's folder (any SDK,
//! any language: it has a `Cargo.toml`, `package.json`, `go.mod`, ...),
//! adds only the fixture file beside it.
//!
//! The template is compiled into the binary, so scaffolding works wherever
//! `wasp` is installed. The crate depends on `wasp-sdk` by path: by default
//! the SDK of the source tree this binary was built from, else `--sdk`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const FILES: [(&str, &str); 5] = [
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
    (crate::filtertest::FIXTURE_FILE, FIXTURE_TEMPLATE),
];

const FIXTURE_TEMPLATE: &str = include_str!("../../examples/filter-template/filter-test.toml");

/// Files that mark a folder as an existing filter project.
const PROJECT_FILES: [&str; 4] = ["Cargo.toml", "package.json", "go.mod", "CMakeLists.txt"];

/// Whether `dir` holds an existing filter project (any language).
fn is_project(dir: &Path) -> bool {
    PROJECT_FILES.iter().any(|f| dir.join(f).is_file())
}

/// Writes only the fixture file into an existing project folder; the
/// filter's name is the folder's (as a crate name would be).
fn add_fixture(dir: &Path) -> Result<PathBuf, String> {
    let path = dir.join(crate::filtertest::FIXTURE_FILE);
    if path.exists() {
        return Err(format!("{} already exists", path.display()));
    }
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "filter".to_string());
    let crate_name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let text = FIXTURE_TEMPLATE
        .replace("{{name}}", &name)
        .replace("{{crate_name}}", &crate_name);
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// Where this binary's own SDK sources were at build time.
const BUILT_WITH_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk");

pub fn new_filter(name: &str, dir: Option<&Path>, sdk: Option<&Path>) -> ExitCode {
    let existing = Path::new(name);
    if dir.is_none() && existing.is_dir() && is_project(existing) {
        return match add_fixture(existing) {
            Ok(path) => {
                println!("created {}", path.display());
                println!(
                    "next: edit its cases, build the module, then: wasp filter test MODULE.wasm {}",
                    path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    match scaffold(name, dir, sdk) {
        Ok(path) => {
            println!("created filter crate {name} in {}", path.display());
            println!(
                "next: cd {} && cargo build --target wasm32-wasip1 --release",
                path.display()
            );
            println!(
                "test it in wasp's engine: wasp filter test target/wasm32-wasip1/release/{}.wasm {}",
                name.replace('-', "_"),
                path.join(crate::filtertest::FIXTURE_FILE).display()
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_fixture_template_parses() {
        let text = super::FIXTURE_TEMPLATE.replace("{{crate_name}}", "my_filter");
        let file = crate::filtertest::fixture::parse(&text).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(file.filter.name, "my_filter");
        assert_eq!(file.cases.len(), 2);
    }
}
