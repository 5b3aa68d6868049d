//! The real `stowage` binary as a child process: started with arguments,
//! its stderr captured line by line, waited for until it listens, signalled,
//! killed (also with kill -9, a real crash) and always reaped on drop.

use std::ffi::OsStr;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `stowage` binary. Dropping it kills it.
pub struct Process {
    child: Child,
    /// Lines not yet looked at by [`Process::wait_line`].
    lines: mpsc::Receiver<String>,
    /// Every stderr line so far.
    log: Arc<Mutex<Vec<String>>>,
    /// The thread reading stderr, joined once the process has exited so
    /// that its last lines are in `log`.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    /// Starts `stowage ARGS...` with `env` set on top of the test's
    /// environment minus `RUST_LOG`; stdin and stdout are null, stderr is
    /// captured.
    pub fn spawn<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
        cmd.args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start stowage");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let all = log.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                all.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    // Nobody waits for lines any more; keep draining.
                    continue;
                }
            }
        });
        Process {
            child,
            lines,
            log,
            reader: Some(reader),
        }
    }

    /// Starts `stowage --config FILE`.
    pub fn with_config(config: &std::path::Path, env: &[(&str, &str)]) -> Process {
        Process::spawn(&[OsStr::new("--config"), config.as_os_str()], env)
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Reads stderr lines until `pick` returns something; fails after 20 s,
    /// showing the log so far.
    pub fn wait_line<T>(&mut self, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = pick(&line) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "expected log line not seen; log so far:\n{}",
                    self.log().join("\n")
                ),
            }
        }
    }

    /// The address from the `stowage listening` line, in the human or the
    /// JSON log format (fields at the top level or under `fields`).
    pub fn listening_addr(&mut self) -> SocketAddr {
        self.wait_line(|l| {
            if !l.contains("stowage listening") {
                return None;
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                let f = if v["fields"].is_object() {
                    &v["fields"]
                } else {
                    &v
                };
                return f["addr"].as_str().and_then(|a| a.parse().ok());
            }
            let at = l.find("addr=")? + 5;
            l[at..].split_whitespace().next()?.parse().ok()
        })
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The exit status, once the process has exited; by then [`Process::log`]
    /// holds every line it wrote (the stderr reader has reached its end).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.try_wait().unwrap()?;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Some(status)
    }

    /// SIGKILL: a crash, nothing cleaned up.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `dir/stowage.toml` for the binary: the tests' configuration for
/// `upstream` with its cache in `dir/cache`, then `extra` TOML.
pub fn write_config(dir: &std::path::Path, upstream: &str, extra: &str) -> std::path::PathBuf {
    let config = dir.join("stowage.toml");
    let toml = super::mirror::config_toml(&dir.join("cache"), upstream, "") + extra;
    std::fs::write(&config, toml).unwrap();
    config
}

/// Runs `stowage ARGS...` to completion (an operator command).
pub async fn run_stowage(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args(&args)
            .output()
            .expect("run stowage")
    })
    .await
    .unwrap()
}

/// Polls `url` until it answers 200; fails after 20 s.
pub async fn wait_http_ok(url: &str) {
    let c = super::client();
    super::within(20, url, async {
        loop {
            if let Ok(r) = c.get(url).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}
