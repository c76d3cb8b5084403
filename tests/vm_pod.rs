//! `ignis vm-pod`, the VM pod's container, as the kubelet runs it: its stdout is what
//! `kubectl logs` shows, and SIGTERM is how the kubelet stops it.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn wait_until(what: &str, within: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn vm_pod_prints_the_console_and_exits_0_on_sigterm_once_the_vm_stopped() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ignis"))
        .args(["vm-pod", "--console-dir"])
        .arg(dir.path())
        .args(["--stop-wait", "20s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ignis vm-pod");
    let printed = Arc::new(Mutex::new(String::new()));
    let reader = {
        let printed = printed.clone();
        let mut stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                printed
                    .lock()
                    .expect("lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let text = || printed.lock().expect("lock").clone();
    // The agent creates the file once the VM boots; vm-pod waits for it.
    std::thread::sleep(Duration::from_millis(300));
    let mut serial = std::fs::File::create(dir.path().join("serial.log")).expect("serial.log");
    serial.write_all(b"ignis: ready\n").expect("write");
    wait_until("the console on stdout", Duration::from_secs(10), || {
        text().contains("ignis: ready")
    });

    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    serial.write_all(b"reboot: Power down\n").expect("write");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "vm-pod exited before the VM stopped"
    );
    std::fs::write(dir.path().join("stopped"), b"").expect("stopped");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vm-pod did not exit after the VM stopped");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    reader.join().expect("reader");
    assert_eq!(text(), "ignis: ready\nreboot: Power down\n");
}
