//! Names the code that renders: `TLM_RENDERER_SOURCE` is a digest of the sources that decide
//! what a version's files are (this crate's `src/` and `defaults/`, the bundle crate's `src/`)
//! and of `Cargo.lock` (the template engine's and the TOML writer's versions). A commit trusts
//! a record of earlier renders only when the same code wrote it
//! (`src/store/versions/rendered.rs`); a rebuild of the same sources keeps it.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let inputs = [
        manifest.join("src"),
        manifest.join("defaults"),
        manifest.join("../nodeos/bundle/src"),
        manifest.join("../Cargo.lock"),
    ];
    let mut paths = Vec::new();
    for input in &inputs {
        println!("cargo:rerun-if-changed={}", input.display());
        if input.is_dir() {
            files(input, &mut paths);
        } else {
            paths.push(input.clone());
        }
    }
    paths.sort();
    let mut hasher = Sha256::new();
    for path in &paths {
        // A source outside this package (a packaged crate has none) counts as absent.
        let content = std::fs::read(path).unwrap_or_default();
        let name = path
            .strip_prefix(&manifest)
            .unwrap_or(path)
            .to_string_lossy();
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((content.len() as u64).to_le_bytes());
        hasher.update(&content);
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    println!("cargo:rustc-env=TLM_RENDERER_SOURCE={hex}");
}
