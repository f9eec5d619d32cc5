//! Test harness: runs the real `sekoia-forwarder` binary against a mock intake on real sockets.
#![allow(dead_code, unused_imports)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use sekoia_forwarder::mock_intake::{FaultConfig, MockIntake, ReceivedEvent, ScriptedFault};
pub use sekoia_forwarder::ready::ReadyInfo;

/// Generous: CI is a busy 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The forwarder binary: cargo's build of this tree, or `E2E_BINARY` (the benchmark compares
/// two builds that way, e.g. a copy of the binary before a change).
pub fn binary() -> &'static str {
    static BINARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        std::env::var("E2E_BINARY")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_sekoia-forwarder").to_owned())
    })
}

/// A running forwarder process.
pub struct Forwarder {
    child: Option<Child>,
    pub source: SocketAddr,
    pub admin: SocketAddr,
    /// What its ready file said: every source's address.
    pub ready: Option<ReadyInfo>,
    pub config: PathBuf,
    log: Arc<Mutex<String>>,
    /// The thread that copies the process's stderr into `log`: joined once the process has
    /// exited, so that `log()` then holds every line it wrote.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// A mock intake on an ephemeral port of 127.0.0.1.
pub async fn start_mock() -> MockIntake {
    MockIntake::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("mock intake")
}

/// A mock intake that answers 503 to every request until its faults are cleared
/// (`set_faults(FaultConfig::default())`): a backlog that stays.
pub async fn refusing_intake() -> MockIntake {
    let mock = start_mock().await;
    mock.set_faults(FaultConfig {
        script: vec![ScriptedFault::Status {
            status: 503,
            retry_after_secs: None,
            times: u32::MAX,
        }],
        ..FaultConfig::default()
    });
    mock
}

/// A forwarder started on a fresh configuration ([`write_config`]) that points at `mock`; its
/// directory lives as long as the returned `TempDir`.
pub fn forwarder_for(
    mock: &MockIntake,
    intake_extra: &str,
    source_extra: &str,
) -> (Forwarder, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock.url(), intake_extra, source_extra);
    (Forwarder::start(&config), dir)
}

/// Writes a configuration with ephemeral ports, the queue under `dir`, and `extra` appended
/// to the `[intake]` table.
pub fn write_config(
    dir: &Path,
    intake_url: &str,
    intake_extra: &str,
    source_extra: &str,
) -> PathBuf {
    let path = dir.join("forwarder.toml");
    let text = format!(
        r#"
[queue]
path = "{queue}"
# Small generations, so that every test also rotates and deletes generations.
generation_bytes = 131072

[intake]
url = "{intake_url}"
linger_ms = 50
backoff_initial_ms = 50
backoff_max_ms = 1000
{intake_extra}

[[source]]
type = "http"
listen = "127.0.0.1:0"
{source_extra}

[admin]
listen = "127.0.0.1:0"
"#,
        queue = dir.join("queue").display(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

impl Forwarder {
    /// Starts the binary and waits until both listeners are up.
    pub fn start(config: &Path) -> Forwarder {
        Forwarder::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Forwarder {
        Forwarder::start_with_stdin(config, env, Stdio::null())
    }

    /// Starts the binary with `stdin` as its standard input (`Stdio::piped()`: then
    /// [`Forwarder::take_stdin`] writes to it).
    pub fn start_with_stdin(config: &Path, env: &[(&str, &str)], stdin: Stdio) -> Forwarder {
        // What the forwarder writes once it is up (`run --ready-file`): a file of an earlier
        // run of this configuration (killed, so it could not remove it) must not be taken for
        // this one's.
        let ready_file = config.with_extension("ready.json");
        match std::fs::remove_file(&ready_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot remove {}: {e}", ready_file.display()),
        }
        let mut cmd = Command::new(binary());
        cmd.args(["run", "--config"])
            .arg(config)
            .arg("--ready-file")
            .arg(&ready_file)
            .env("RUST_LOG", "info,sekoia_forwarder=debug")
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // If the test process dies (a timeout kills it), the forwarder must not live on.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().expect("spawn sekoia-forwarder");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        let mut fwd = Forwarder {
            child: Some(child),
            source: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            ready: None,
            config: config.to_owned(),
            log,
            reader: Some(reader),
        };
        let ready = fwd.wait_ready(&ready_file);
        fwd.source = ready
            .sources
            .first()
            .expect("no source in the ready file")
            .listen;
        fwd.admin = ready.admin.expect("the admin listener is off");
        fwd.ready = Some(ready);
        fwd
    }

    /// The pipe to its standard input, if it was started with one.
    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.as_mut().and_then(|c| c.stdin.take())
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap_or_else(|e| panic!("no metrics: {e}\n{}", self.log()))
            .text()
            .await
            .expect("metrics text")
    }

    /// Where its syslog source of this transport (`udp`, `tcp`, `tls`) listens.
    pub fn syslog(&self, transport: &str) -> SocketAddr {
        let ready = self.ready.as_ref().expect("started");
        ready
            .sources
            .iter()
            .find(|s| s.kind == "syslog" && s.transport.as_deref() == Some(transport))
            .unwrap_or_else(|| panic!("no {transport} syslog source in {ready:?}"))
            .listen
    }

    /// Waits for this process's ready file; panics with its log if it exits first or the
    /// deadline passes.
    fn wait_ready(&mut self, path: &Path) -> ReadyInfo {
        let child = self.child.as_mut().expect("started");
        match wait_ready_file(path, child) {
            Some(ready) => ready,
            None => {
                // Exited or stuck: kill it so that its whole log can be read.
                self.kill9();
                panic!("forwarder not ready within {DEADLINE:?}:\n{}", self.log());
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.source)
    }

    /// What the process wrote to stderr so far; all of it once it has exited (the reader is
    /// joined when the exit is seen).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the stderr reader to see the end of the pipe (the process has exited).
    fn join_reader(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.join_reader();
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        let status = wait_exit(&mut child);
        self.join_reader();
        status
    }

    /// Waits for the process to exit by itself (a crash point).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = wait_exit(&mut child);
        self.join_reader();
        status
    }

    /// The `/status` report of the running forwarder.
    pub async fn status(&self) -> serde_json::Value {
        // A timeout, so that a forwarder that stopped answering fails the test, not hangs it.
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
            .get(format!("http://{}/status", self.admin))
            .send()
            .await
            .unwrap_or_else(|e| panic!("no status: {e}\n{}", self.log()))
            .json()
            .await
            .expect("status json")
    }

    /// Waits until the queue holds no event.
    pub async fn wait_drained(&self) {
        let ok = wait_until_async(DEADLINE, || async {
            let s = self.status().await;
            s["queue"]["events"].as_u64() == Some(0)
        })
        .await;
        assert!(ok, "queue did not drain:\n{}", self.log());
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("forwarder did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Waits until `child` has written its ready file (`run --ready-file path`) and returns what it
/// says; `None` if the process exits first or [`DEADLINE`] passes.
pub fn wait_ready_file(path: &Path, child: &mut Child) -> Option<ReadyInfo> {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(path) {
            let ready: ReadyInfo = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("bad ready file {}: {e}: {text}", path.display()));
            assert_eq!(ready.pid, child.id(), "the ready file of another process");
            return Some(ready);
        }
        if !matches!(child.try_wait(), Ok(None)) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Polls `f` until it is true or `deadline` passes.
pub async fn wait_until_async<F, Fut>(deadline: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sends events `first..first+n` to the forwarder's `/jsons` in requests of `per_request`
/// events, one after the other, and returns the ids of the events that got a 2xx.
pub async fn send_events(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    first: usize,
    n: usize,
    per_request: usize,
) -> Vec<String> {
    let mut acked = Vec::new();
    let mut i = first;
    while i < first + n {
        let batch: Vec<String> = (i..(i + per_request).min(first + n)).map(event).collect();
        i += batch.len();
        if post_jsons(client, url, key, &batch).await {
            acked.extend(batch);
        }
    }
    acked
}

/// POSTs one batch; true on a 2xx with one id per event.
pub async fn post_jsons(client: &reqwest::Client, url: &str, key: &str, batch: &[String]) -> bool {
    post_jsons_outcome(client, url, key, batch).await == Sent::Acked
}

/// What became of one request to the forwarder, as its sender knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// A 2xx with one id per event: every event must reach the intake.
    Acked,
    /// An answer that refuses the request: none of its events may reach the intake.
    Refused,
    /// No answer (the connection died with the forwarder): its events may arrive or not.
    Unknown,
}

/// POSTs one batch and says what its sender learnt.
pub async fn post_jsons_outcome(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    batch: &[String],
) -> Sent {
    let answer = client
        .post(format!("{url}/jsons"))
        .header("X-SEKOIAIO-INTAKE-KEY", key)
        .json(batch)
        .send()
        .await;
    let Ok(answer) = answer else {
        return Sent::Unknown;
    };
    if !answer.status().is_success() {
        return Sent::Refused;
    }
    match answer.json::<serde_json::Value>().await {
        Ok(body) if body["event_ids"].as_array().map(|a| a.len()) == Some(batch.len()) => {
            Sent::Acked
        }
        // A 2xx whose body did not arrive whole: the events were stored, or not.
        Err(_) => Sent::Unknown,
        Ok(_) => Sent::Refused,
    }
}

pub fn event(i: usize) -> String {
    format!("event-{i:08} {}", "x".repeat(180))
}

/// Asserts every id of `acked` reached the mock; returns the number of duplicates it got.
pub fn assert_all_delivered(mock: &MockIntake, acked: &[String]) -> usize {
    let got = mock.events();
    let mut seen = std::collections::HashMap::new();
    for e in &got {
        *seen.entry(e.raw.as_str()).or_insert(0usize) += 1;
    }
    let missing: Vec<&String> = acked
        .iter()
        .filter(|e| !seen.contains_key(e.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events never reached the intake, first: {:?}",
        missing.len(),
        missing.first()
    );
    seen.values().map(|n| n - 1).sum()
}

/// Asserts that the intake received exactly what was acknowledged, as a set: every event of
/// `acked`, and nothing but those and the events of `unknown` (requests whose answer was lost
/// with the forwarder). A phantom, a garbled event or one of a refused request fails. Returns
/// the number of duplicates.
pub fn assert_received_only(mock: &MockIntake, acked: &[String], unknown: &[String]) -> usize {
    let dups = assert_all_delivered(mock, acked);
    let allowed: std::collections::HashSet<&str> =
        acked.iter().chain(unknown).map(|s| s.as_str()).collect();
    let got = mock.events();
    let strangers: Vec<&str> = got
        .iter()
        .map(|e| e.raw.as_str())
        .filter(|e| !allowed.contains(e))
        .collect();
    assert!(
        strangers.is_empty(),
        "the intake received {} event(s) no sender had sent or had seen acknowledged, first: {:?}",
        strangers.len(),
        strangers.first()
    );
    dups
}

/// Asserts that no generation is left half made (`gen-*.new`) or half deleted
/// (`gen-*.deleted`) in the queue directory: what an open must finish or undo.
pub fn assert_no_leftover_generations(queue_dir: &Path) {
    let leftovers: Vec<String> = std::fs::read_dir(queue_dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", queue_dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-") && (n.ends_with(".new") || n.ends_with(".deleted")))
        .collect();
    assert!(
        leftovers.is_empty(),
        "left in {}: {leftovers:?}",
        queue_dir.display()
    );
}

/// Waits until the mock holds every event of `acked`.
pub async fn wait_delivered(mock: &MockIntake, acked: &[String]) {
    wait_for_all(mock, acked, String::new).await
}

/// [`wait_delivered`], printing the forwarder's log if it fails.
pub async fn wait_delivered_from(fwd: &Forwarder, mock: &MockIntake, acked: &[String]) {
    wait_for_all(mock, acked, || fwd.log()).await
}

async fn wait_for_all(mock: &MockIntake, acked: &[String], log: impl FnOnce() -> String) {
    // An empty set would pass whatever happened: a test that acknowledged nothing proves
    // nothing.
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged: the test proves nothing"
    );
    let want: std::collections::HashSet<&str> = acked.iter().map(|s| s.as_str()).collect();
    let ok = mock
        .wait_for(
            |events| {
                let have: std::collections::HashSet<&str> =
                    events.iter().map(|e| e.raw.as_str()).collect();
                want.iter().all(|w| have.contains(w))
            },
            DEADLINE,
        )
        .await;
    assert!(
        ok,
        "not every acknowledged event reached the mock in time ({} of {} distinct events there):\n{}",
        mock.events().len(),
        acked.len(),
        log()
    );
}

/// Runs `sekoia-forwarder <command> --json --config <config>`; returns its output as text and
/// as JSON. Fails the test if the command fails.
pub fn run_json_command(command: &str, config: &Path) -> (String, serde_json::Value) {
    let out = Command::new(binary())
        .args([command, "--json", "--config"])
        .arg(config)
        .output()
        .expect("run the binary");
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{command}: {e}: {text}"));
    (text, json)
}

/// A mock intake that answers after 20 ms, so that a queue holds a backlog under load.
pub async fn slow_mock() -> MockIntake {
    let mock = MockIntake::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("mock intake");
    mock.set_faults(FaultConfig {
        delay_ms: 20,
        ..FaultConfig::default()
    });
    mock
}

impl Forwarder {
    /// Stops the forwarder (SIGTERM; it must exit cleanly) and returns its whole log: waits
    /// until the thread reading stderr has read it to the end, so that a check that something
    /// is *not* in the log sees all of it. That thread holds the other reference to the log
    /// until it ends.
    pub fn stop_and_log(&mut self) -> String {
        let status = self.terminate();
        assert!(
            status.success(),
            "forwarder exited with {status}:\n{}",
            self.log()
        );
        let deadline = Instant::now() + DEADLINE;
        while Arc::strong_count(&self.log) > 1 {
            assert!(Instant::now() < deadline, "the log reader never finished");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.log()
    }
}

/// A syslog relay (rsyslog, syslog-ng) that a test started: killed (SIGKILL) when dropped,
/// so that a failing test leaves none behind. Its output goes to `relay.log` in its directory.
pub struct Relay {
    child: Child,
    pub name: String,
    pub log_path: PathBuf,
}

impl Relay {
    /// Starts `program args` with its standard output and error in `log_path`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log_path: PathBuf,
    ) -> Relay {
        let log = std::fs::File::create(&log_path).expect("relay log");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("relay log"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // If the test process dies, the relay must not live on.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Relay {
            child,
            name: name.to_owned(),
            log_path,
        }
    }

    /// What it wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Panics with its log if it has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status}:\n{}", self.name, self.log());
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds a relay's program on `PATH` or at one of `places`. Missing: `None` with a loud
/// message, unless `CI` is set, where a missing relay fails the test.
pub fn find_program(name: &str, places: &[&str]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d: PathBuf| d.join(name));
    let found = on_path
        .chain(places.iter().map(PathBuf::from))
        .find(|p| p.is_file());
    if found.is_none() {
        let ci = std::env::var("CI").map(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(
            !ci.unwrap_or(false),
            "{name} is not installed, and CI is set: .ci/run installs it"
        );
        eprintln!("\n=== SKIPPED: {name} is not installed (.ci/run installs it; CI fails without it) ===\n");
    }
    found
}
