//! Workload 1: one large file, put and get

#[allow(unused_imports)]
use crate::prelude::*;

/// Per-operation series of workload 1 for one netdisk variant.
#[derive(Default)]
pub struct OpSeries {
    pub mbps: Vec<f64>,
    pub client_cpu: Vec<f64>,
    pub server_cpu: Vec<f64>,
    pub server_peak: Vec<f64>,
    pub client_peak: Vec<f64>,
}

impl OpSeries {
    pub fn push(&mut self, bytes: u64, run: &ChildRun, server_cpu: f64, server_peak: f64) {
        self.mbps.push(mb_per_s(bytes, run.wall));
        self.client_cpu.push(run.cpu);
        self.server_cpu.push(server_cpu);
        self.server_peak.push(server_peak);
        self.client_peak.push(run.max_rss_mib);
    }
}

/// A netdisk CLI transfer against `server`, measured with the server's CPU and peak RSS.
pub fn measured_cli(server: &ServerProc, cmd: Command) -> Result<(ChildRun, f64, f64)> {
    sync_disks();
    server.reset_peak();
    let cpu_before = server.cpu();
    let run = run_measured(cmd, &server.errlog())?;
    Ok((run, server.cpu() - cpu_before, server.peak_rss_mib()))
}

pub fn workload_large(env: &Env, s: &Settings, peers: &Peers, report: &mut Report) -> Result<()> {
    let w = "1 large file";
    let size = s.size;
    let src_dir = env.work.join("src");
    fs::create_dir_all(&src_dir)?;
    let src = src_dir.join("big.bin");
    eprintln!("workload 1: writing {} MiB of random bytes", size / MIB);
    write_random_file(&src, size, 1)?;
    let out = env.work.join("out");
    fs::create_dir_all(&out)?;

    let mut servers = Vec::new();
    for &variant in &env.variants {
        let mut server = ServerProc::start(env, &format!("w1-{}", variant.label()), variant, 64)?;
        match server.add_user(&env.rt, s.iterations) {
            Ok(()) => servers.push((server, OpSeries::default(), OpSeries::default())),
            Err(e) => report.fail(&format!("workload 1 ({}): setup", variant.label()), &e),
        }
    }
    let mut raw = Vec::new();
    let mut raw_cpu = Vec::new();
    let mut raw_fsync = Vec::new();
    let mut peer_series: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut failed: Vec<String> = Vec::new();
    for run in 0..s.runs {
        eprintln!("workload 1: run {}/{}", run + 1, s.runs);
        // The yardstick: into the same folder as the server's data.
        let dst = servers.first().map_or_else(
            || env.work.join("raw.bin"),
            |(srv, _, _)| srv.root.join("raw.bin"),
        );
        for fsync in [false, true] {
            sync_disks();
            let (secs, cpu) = raw_copy(&env.rt, &src, &dst, fsync)?;
            remove(&dst);
            if fsync {
                raw_fsync.push(mb_per_s(size, secs));
            } else {
                raw.push(mb_per_s(size, secs));
                raw_cpu.push(cpu);
            }
        }
        for (server, put, get) in servers.iter_mut() {
            let label = server.variant.label();
            if failed.iter().any(|f| f == label) {
                continue;
            }
            let result = (|| -> Result<()> {
                let mut cmd = server.cli("put");
                cmd.arg(&src).arg("big.bin");
                let (r, cpu, peak) = measured_cli(server, cmd)?;
                put.push(size, &r, cpu, peak);
                let target = out.join("big.bin");
                remove(&target);
                let mut cmd = server.cli("get");
                cmd.arg("big.bin").arg(&target);
                let (r, cpu, peak) = measured_cli(server, cmd)?;
                get.push(size, &r, cpu, peak);
                let got = fs::metadata(&target)?.len();
                if got != size {
                    bail!("get wrote {got} bytes, expected {size}");
                }
                remove(&target);
                Ok(())
            })();
            if let Err(e) = result {
                report.fail(&format!("workload 1 ({label})"), &e);
                failed.push(label.to_string());
            }
        }
        peers_large(env, peers, &src, size, &mut peer_series, report);
    }
    report.yardstick("raw", &raw);
    report.yardstick("raw+fsync", &raw_fsync);
    report.row(w, "raw TCP copy", "copy", "MB/s", raw.clone());
    report.row(w, "raw TCP copy", "copy CPU, both ends", "s", raw_cpu);
    report.row(w, "raw TCP copy", "copy + fsync", "MB/s", raw_fsync.clone());
    for (key, samples) in &peer_series {
        report.yardstick(key, samples);
        let (peer, op) = key.split_once(' ').unwrap_or((key, ""));
        report
            .row(w, peer, op, "MB/s", samples.clone())
            .compare
            .push(("raw", "raw".into()));
    }
    for (server, put, get) in servers {
        let label = server.variant.label();
        for (op, series) in [("put", put), ("get", get)] {
            if series.mbps.is_empty() {
                continue;
            }
            let row = report.row(w, label, op, "MB/s", series.mbps);
            row.compare.push(("raw", "raw".into()));
            if op == "put" {
                row.compare.push(("raw+fsync", "raw+fsync".into()));
            }
            for peer in ["sftp", "rsync", "dufs"] {
                row.compare.push((peer, format!("{peer} {op}")));
            }
            let both: Vec<f64> = series
                .client_cpu
                .iter()
                .zip(&series.server_cpu)
                .map(|(c, s)| c + s)
                .collect();
            report.row(w, label, &format!("{op} CPU, both ends"), "s", both);
            report.row(
                w,
                label,
                &format!("{op} client CPU"),
                "s",
                series.client_cpu,
            );
            report.row(
                w,
                label,
                &format!("{op} server CPU"),
                "s",
                series.server_cpu,
            );
            report.row(
                w,
                label,
                &format!("{op} server peak RSS"),
                "MiB",
                series.server_peak,
            );
            report.row(
                w,
                label,
                &format!("{op} client peak RSS"),
                "MiB",
                series.client_peak,
            );
        }
    }
    Ok(())
}

/// One large put and get with each running peer (files into their own data folders).
pub fn peers_large(
    env: &Env,
    peers: &Peers,
    src: &Path,
    size: u64,
    series: &mut BTreeMap<String, Vec<f64>>,
    report: &mut Report,
) {
    let out = env.work.join("out").join("peer-big.bin");
    let mut record = |key: &str, result: Result<f64>, report: &mut Report| match result {
        Ok(secs) => series
            .entry(key.into())
            .or_default()
            .push(mb_per_s(size, secs)),
        Err(e) => report.fail(&format!("peer {key}"), &e),
    };
    if let Some(sftp) = &peers.sftp {
        let remote = sftp.data.join("big.bin");
        sync_disks();
        let put = sftp.batch(&[format!("put {} {}", src.display(), remote.display())]);
        record("sftp put", put.map(|r| r.wall), report);
        sync_disks();
        remove(&out);
        let get = sftp.batch(&[format!("get {} {}", remote.display(), out.display())]);
        record("sftp get", get.map(|r| r.wall), report);
        remove(&out);
    }
    if let Some(rsync) = &peers.rsync {
        sync_disks();
        let put = rsync.run(&[src.display().to_string(), format!("{}/big.bin", rsync.url)]);
        record("rsync put", put.map(|r| r.wall), report);
        sync_disks();
        remove(&out);
        let get = rsync.run(&[format!("{}/big.bin", rsync.url), out.display().to_string()]);
        record("rsync get", get.map(|r| r.wall), report);
        remove(&out);
    }
    if let Some(dufs) = &peers.dufs {
        let addr = dufs.addr.clone();
        let (src, dst) = (src.to_path_buf(), out.clone());
        sync_disks();
        let started = Instant::now();
        let put = env.rt.block_on(async {
            let mut http = Http::connect(&addr).await?;
            http.put("/big.bin", &src).await
        });
        record(
            "dufs put",
            put.map(|()| started.elapsed().as_secs_f64()),
            report,
        );
        sync_disks();
        let started = Instant::now();
        let get = env.rt.block_on(async {
            let mut http = Http::connect(&addr).await?;
            http.get("/big.bin", &dst).await
        });
        record(
            "dufs get",
            get.map(|()| started.elapsed().as_secs_f64()),
            report,
        );
        remove(&out);
    }
}
