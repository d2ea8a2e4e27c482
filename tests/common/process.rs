//! Runs the crate's examples as real processes on 127.0.0.1.
#![allow(dead_code, unreachable_pub)]

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

/// An example process, killed when dropped.
pub struct Example {
    pub child: Child,
    pub base: String,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where cargo put the examples it built for this test run.
pub fn example_path(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test binary path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test` so the examples are built",
        path.display()
    );
    path
}

/// Starts example `name` on a free port with `env`, and waits for the line
/// that announces `http://ADDR`.
pub fn start(name: &str, env: &[(&str, &str)]) -> Example {
    let mut command = Command::new(example_path(name));
    command
        .env("PORT", "0")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = command.spawn().expect("spawn example");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let base = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("example {name} exited before listening"))
            .expect("read stdout");
        if let Some(at) = line.find("http://") {
            let addr: String = line[at..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            break addr;
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Example { child, base }
}
