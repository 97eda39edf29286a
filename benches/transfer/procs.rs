//! Processes: measured children, the server child, /proc readings

#[allow(unused_imports)]
use crate::prelude::*;

/// A finished child process: wall time and its own resource usage (from wait4).
pub struct ChildRun {
    pub wall: f64,
    pub cpu: f64,
    pub max_rss_mib: f64,
}

pub fn timeval_secs(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
}

/// Run `cmd` to its end, stderr into `errlog`; fails (with that stderr) unless it exits 0.
pub fn run_measured(mut cmd: Command, errlog: &Path) -> Result<ChildRun> {
    let err = File::create(errlog)?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
    let started = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child; pointers are to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("wait4");
        }
    }
    let wall = started.elapsed().as_secs_f64();
    drop(child); // already reaped; dropping a Child neither waits nor kills
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        let stderr = fs::read_to_string(errlog).unwrap_or_default();
        bail!(
            "{:?} {:?} failed (status {status}): {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            stderr.trim()
        );
    }
    Ok(ChildRun {
        wall,
        cpu: timeval_secs(usage.ru_utime) + timeval_secs(usage.ru_stime),
        // ru_maxrss is in KiB on Linux.
        max_rss_mib: usage.ru_maxrss as f64 / 1024.0,
    })
}

/// user+system CPU seconds of a process, all its threads, from /proc/PID/stat.
pub fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    (ticks(11) + ticks(12)) / hz
}

/// CPU seconds of a process's live threads, to the nanosecond (/proc/PID/task/*/schedstat;
/// /proc/PID/stat counts 10 ms ticks, too coarse for a burst of a few ms).
pub fn proc_cpu_secs_fine(pid: u32) -> f64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return f64::NAN;
    };
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    nanos as f64 / 1e9
}

/// A `Vm*` line of /proc/PID/status, in MiB.
pub fn proc_status_mib(pid: u32, key: &str) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Our own CPU time so far (this process: the raw copy, the in-process clients).
pub fn self_cpu_secs() -> f64 {
    // SAFETY: rusage is plain old data; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    timeval_secs(usage.ru_utime) + timeval_secs(usage.ru_stime)
}

/// Flush dirty pages, so one measurement's writeback does not land in the next.
pub fn sync_disks() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

pub fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Wait until something accepts connections on `addr` (the child must stay alive).
pub fn wait_for_port(addr: &str, child: &mut Child, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let sock: SocketAddr = addr.parse()?;
    while Instant::now() < deadline {
        if StdStream::connect_timeout(&sock, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited ({status}) before listening: {}",
                fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("{what} did not listen on {addr} within 20 s")
}

/// Stop a child we started: SIGINT (or SIGTERM), then SIGKILL after a grace period.
pub fn stop_child(child: &mut Child, signal: libc::c_int) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A server child process (netdisk or a peer) listening on a loopback address: started
/// and stopped the same way for all of them.
pub struct Daemon {
    pub child: Child,
    /// How it is asked to stop (SIGINT for netdisk's graceful shutdown, else SIGTERM).
    stop_signal: libc::c_int,
}

impl Daemon {
    /// Spawn `cmd` and wait until it accepts connections on `addr`; `log` is where its
    /// output goes (shown if it exits early). A child that never listens is killed.
    pub fn start(
        mut cmd: Command,
        addr: &str,
        what: &str,
        log: &Path,
        stop_signal: libc::c_int,
    ) -> Result<Daemon> {
        let mut child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        if let Err(e) = wait_for_port(addr, &mut child, what, log) {
            stop_child(&mut child, libc::SIGKILL);
            return Err(e);
        }
        Ok(Daemon { child, stop_signal })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, self.stop_signal);
    }
}
