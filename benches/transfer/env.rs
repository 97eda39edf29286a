//! Environment: where things are, what the machine is

#[allow(unused_imports)]
use crate::prelude::*;

pub struct Env {
    pub bin: PathBuf,
    pub work: PathBuf,
    pub variants: Vec<Variant>,
    pub rt: tokio::runtime::Runtime,
}

pub fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn machine_facts(env: &Env) -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let cpu = field("model name")
        .or_else(|| field("Hardware"))
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let os = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    let data_fs = file_system_of(&env.work).unwrap_or_else(|| "unknown".into());
    let netdisk =
        command_output(env.bin.to_str().unwrap_or("netdisk"), &["--version"]).unwrap_or_default();
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]).map(|c| {
        let dirty = command_output("git", &["status", "--porcelain", "--untracked-files=no"])
            .is_some_and(|s| !s.is_empty());
        if dirty {
            format!("{c} (with uncommitted changes)")
        } else {
            c
        }
    });
    let tls = if env.variants.contains(&Variant::Tls) {
        "available: measured with TLS and with --no-tls"
    } else {
        "not available in this build"
    };
    let load = load_average();
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": cores,
        "memory": memory,
        "kernel": kernel,
        "os": os,
        "data_dir": env.work.display().to_string(),
        "data_fs": data_fs,
        "netdisk": netdisk,
        "binary": env.bin.display().to_string(),
        "commit": commit,
                "tls": tls,
        "load_at_start": load,
        "date": date,
    })
}

/// The 1, 5 and 15 minute load averages: other work on the machine shows up here.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// "ext4 on /dev/vda (mounted at /)": the mount with the longest prefix of `path`.
pub fn file_system_of(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [device, mount_point, fs_type, ..] = parts[..] else {
            continue;
        };
        let mount_point = mount_point.replace("\\040", " ");
        if path.starts_with(&mount_point)
            && best
                .as_ref()
                .is_none_or(|(len, _)| mount_point.len() >= *len)
        {
            best = Some((
                mount_point.len(),
                format!("{fs_type} on {device} (mounted at {mount_point})"),
            ));
        }
    }
    best.map(|(_, description)| description)
}

/// Raise the soft open-files limit to the hard one (1,000 clients in one process).
/// The hard open-files limit (what any process of this user can raise its own to).
pub fn hard_fd_limit() -> u64 {
    // SAFETY: rlimit is plain old data.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    limit.rlim_max as u64
}

pub fn raise_fd_limit(wanted: u64) -> u64 {
    // SAFETY: rlimit is plain old data.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    if (limit.rlim_cur as u64) < wanted {
        limit.rlim_cur = limit
            .rlim_max
            .min(wanted.max(limit.rlim_cur as u64) as libc::rlim_t);
        // SAFETY: valid pointer to a local.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
    limit.rlim_cur as u64
}

/// Whether this build has TLS: the server's help mentions `--no-tls`.
pub fn detect_variants(bin: &Path) -> Vec<Variant> {
    let help = Command::new(bin)
        .args(["serve", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if help.contains("--no-tls") {
        vec![Variant::Tls, Variant::Plain]
    } else {
        vec![Variant::PlainOnly]
    }
}

/// Whether the client has a subcommand (`mput`, `mget`).
pub fn has_subcommand(bin: &Path, name: &str) -> bool {
    Command::new(bin)
        .args([name, "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fill `path` with `len` pseudo-random (incompressible) bytes.
pub fn write_random_file(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut file = std::io::BufWriter::with_capacity(BLOCK, File::create(path)?);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut block = vec![0u8; BLOCK];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(BLOCK as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

pub fn remove(path: &Path) {
    let _ = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
}
