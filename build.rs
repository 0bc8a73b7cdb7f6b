//! Records the git commit the binary is built from, for the `build_info` metric. A build outside
//! a git checkout (e.g. a Docker build without `.git`) may pass it as `KETCHUP_GIT_COMMIT`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KETCHUP_GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::env::var("KETCHUP_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let output = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            output
                .status
                .success()
                .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=KETCHUP_GIT_COMMIT={commit}");
}
