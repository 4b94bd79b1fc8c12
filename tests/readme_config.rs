//! Every environment variable the relay reads is documented in the README.
use std::fs;

fn env_vars_in_source() -> Vec<String> {
    let mut vars = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src"
    ))];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).expect("read src") {
            let path = e.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let text = fs::read_to_string(&path).expect("read file");
                for part in text.split("env = \"").skip(1) {
                    if let Some(end) = part.find('"') {
                        vars.push(part[..end].to_string());
                    }
                }
            }
        }
    }
    vars.sort();
    vars.dedup();
    vars
}

#[test]
fn every_env_var_is_in_the_readme() {
    let readme =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let vars = env_vars_in_source();
    assert!(vars.len() > 20, "found only {vars:?}");
    let missing: Vec<&String> = vars
        .iter()
        .filter(|v| !readme.contains(&format!("`{v}`")))
        .collect();
    assert!(missing.is_empty(), "undocumented env vars: {missing:?}");
}
