//! The systemd side: the notify protocol (READY, WATCHDOG, RELOADING with
//! MONOTONIC_USEC, STOPPING) and the shipped unit file.

mod common;

use std::{
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{BIN, Setup, wait_exit};

const CONFIG: &str = r#"
[daemon]
state = "sqlite://{dir}/state.db"
listen = "127.0.0.1:{port}"
[crm]
type = "file"
path = "{dir}/crm.json"
[sources.demo]
type = "demo"
schedule = "every 1m"
"#;

/// Reads notify messages until one contains `wanted` (or panics after 10 s).
fn expect_message(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) -> String {
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(10) {
        if let Ok(n) = socket.recv(&mut buffer) {
            let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
            seen.push(message.clone());
            if message.lines().any(|line| line == wanted || line.starts_with(wanted)) {
                return message;
            }
        }
    }
    panic!("no {wanted:?} from the daemon; got {seen:?}");
}

#[test]
fn speaks_the_notify_protocol_through_start_watchdog_reload_and_stop() {
    let setup = Setup::new();
    let config = setup.write_config(CONFIG);
    let socket_path = setup.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();

    // exec keeps the shell's pid, so WATCHDOG_PID names the daemon, as systemd's would.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("WATCHDOG_PID=$$ exec '{BIN}' run --config '{}'", config.display()))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    expect_message(&socket, "READY=1", &mut seen);
    expect_message(&socket, "WATCHDOG=1", &mut seen);
    expect_message(&socket, "WATCHDOG=1", &mut seen);

    assert!(Command::new("kill").arg("-HUP").arg(child.id().to_string()).status().unwrap().success());
    let reloading = expect_message(&socket, "RELOADING=1", &mut seen);
    let usec =
        reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).expect("MONOTONIC_USEC with RELOADING");
    assert!(usec.parse::<u64>().unwrap() > 0);
    expect_message(&socket, "READY=1", &mut seen);

    assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
    expect_message(&socket, "STOPPING=1", &mut seen);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status}");
}

#[test]
fn the_shipped_unit_passes_systemd_analyze_verify() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd to run this check)");
        return;
    };
    assert!(version.status.success());
    let setup = Setup::new();
    let credential = setup.path("hubspot");
    std::fs::write(&credential, "token\n").unwrap();
    let discourse = setup.path("discourse");
    std::fs::write(&discourse, "key\n").unwrap();
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tributary.service")).unwrap();
    // The unit names the installed paths; point them at this build.
    let unit = unit
        .replace("/usr/local/bin/tributary", BIN)
        .replace("/etc/tributary/credentials/hubspot", &credential.display().to_string())
        .replace("/etc/tributary/credentials/discourse", &discourse.display().to_string());
    let path = setup.path("tributary.service");
    std::fs::write(&path, unit).unwrap();
    let output = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let problems: Vec<_> = stderr.lines().filter(|l| l.contains("tributary.service")).collect();
    assert!(problems.is_empty(), "systemd-analyze complains:\n{stderr}");
    let original = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tributary.service")).unwrap();
    // The production config checks clean with the credentials the unit loads.
    let production = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/production.toml")).unwrap();
    let config = setup.path("production.toml");
    std::fs::write(&config, production).unwrap();
    let check = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .env("CREDENTIALS_DIRECTORY", setup.dir.path())
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    for hardening in [
        "Type=notify",
        "WatchdogSec=",
        "DynamicUser=yes",
        "StateDirectory=",
        "ConfigurationDirectory=",
        "LoadCredential=",
        "ProtectSystem=strict",
    ] {
        assert!(original.contains(hardening), "the unit lacks {hardening}");
    }
}
