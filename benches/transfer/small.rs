//! Workload 3: many small files through one client

#[allow(unused_imports)]
use crate::prelude::*;

pub fn workload_small(env: &Env, s: &Settings, peers: &Peers, report: &mut Report) -> Result<()> {
    let w = "3 small files";
    let n = s.small_files;
    let dir = env.work.join("small");
    fs::create_dir_all(&dir)?;
    eprintln!(
        "workload 3: writing {n} files of {} KiB",
        s.small_size / 1024
    );
    let names: Vec<String> = (0..n).map(|i| format!("f{i:06}.bin")).collect();
    for (i, name) in names.iter().enumerate() {
        write_small(&dir.join(name), s.small_size, i as u64 + 7)?;
    }
    sync_disks();
    let mput = has_subcommand(&env.bin, "mput") && has_subcommand(&env.bin, "mget");
    // Every run uploads into a fresh remote folder and downloads into a fresh local one;
    // nothing is deleted until the workload ends. On an ext4 without a journal (this VM's
    // disk) each file creation scans every inode deleted in the last minute
    // (`recently_deleted` in the kernel's inode allocator: 62% of an `mget` client's samples
    // right after 3,000 deletions), so deleting one run's files before the next made every
    // tool's runs 2-3 times slower than its first and measured the allocator instead.
    let small = Small {
        dir: dir.clone(),
        out: env.work.join("small-out"),
        names: names.clone(),
        mput,
    };
    remove(&small.out);
    let mut servers = Vec::new();
    for &variant in &env.variants {
        let label = variant.label();
        let started = (|| -> Result<(ServerProc, Lib)> {
            let mut server = ServerProc::start(env, &format!("w3-{label}"), variant, 64)?;
            server.add_user(&env.rt, s.iterations)?;
            let lib = server.lib()?;
            Ok((server, lib))
        })();
        match started {
            Ok((server, lib)) => servers.push((server, lib, SmallSeries::default())),
            Err(e) => report.fail(&format!("workload 3 ({label}): setup"), &e),
        }
    }
    let mut peer_rates: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in 0..s.runs {
        eprintln!("workload 3: run {}/{}", run + 1, s.runs);
        for (server, lib, series) in servers.iter_mut() {
            if series.failed {
                continue;
            }
            if let Err(e) = small_run(env, server, lib, &small, series, run) {
                report.fail(&format!("workload 3 ({})", server.variant.label()), &e);
                series.failed = true;
            }
        }
        peers_small(env, peers, &dir, &names, run, &mut peer_rates, report);
    }
    // One `netdisk put` process per file, as a shell loop would do without mput.
    let k = s.cli_files.min(n);
    for (server, lib, series) in servers.iter_mut() {
        if k == 0 || series.failed {
            continue;
        }
        let to = "cli-loop/";
        if let Err(e) = env.rt.block_on(async {
            let mut client = lib.client().await?;
            client.mkdir(to, true).await?;
            client.quit().await?;
            anyhow::Ok(())
        }) {
            report.fail("workload 3 (CLI loop)", &e);
            continue;
        }
        sync_disks();
        let started = Instant::now();
        let result = names[..k].iter().try_for_each(|name| {
            let mut cmd = server.cli("put");
            cmd.arg(dir.join(name)).arg(format!("{to}{name}"));
            run_measured(cmd, &server.errlog()).map(|_| ())
        });
        match result {
            Ok(()) => series
                .cli_rate
                .push(k as f64 / started.elapsed().as_secs_f64()),
            Err(e) => report.fail("workload 3 (CLI loop)", &e),
        }
    }
    remove(&small.out);
    remove(&env.work.join("small-out-peer"));

    for (key, rates) in &peer_rates {
        report.yardstick(key, rates);
        let (peer, op) = key.split_once(' ').unwrap_or((key, ""));
        report.row(w, peer, op, "files/s", rates.clone());
    }
    let compare = |row: &mut Row, op: &str| {
        for peer in ["sftp", "rsync", "dufs"] {
            row.compare.push((peer, format!("{peer} {op}")));
        }
    };
    for (server, _, series) in servers {
        let label = server.variant.label();
        let lib = format!("{label}, Client loop");
        if !series.put_rate.is_empty() {
            compare(
                report.row(w, &lib, "put (1 connection)", "files/s", series.put_rate),
                "mput",
            );
            report.row(w, &lib, "put server CPU", "s", series.put_cpu);
            compare(
                report.row(w, &lib, "get (1 connection)", "files/s", series.get_rate),
                "mget",
            );
            report.row(w, &lib, "get server CPU", "s", series.get_cpu);
        }
        if !series.mput_rate.is_empty() {
            compare(
                report.row(w, label, "mput", "files/s", series.mput_rate),
                "mput",
            );
            compare(
                report.row(w, label, "mget", "files/s", series.mget_rate),
                "mget",
            );
        }
        if !series.cli_rate.is_empty() {
            let row = report.row(
                w,
                &format!("{label}, CLI loop"),
                &format!("put x{k}, 1 process each"),
                "files/s",
                series.cli_rate,
            );
            compare(row, "mput");
        }
    }
    if !mput {
        report.note(
            "workload 3: `netdisk mput`/`mget` are not in this build; measured a loop of \
             Client::put / Client::get over one connection instead (no pipelining)",
        );
    }
    Ok(())
}

/// The small files of workload 3 and where downloads go.
pub struct Small {
    pub dir: PathBuf,
    pub out: PathBuf,
    pub names: Vec<String>,
    pub mput: bool,
}

#[derive(Default)]
pub struct SmallSeries {
    pub put_rate: Vec<f64>,
    pub get_rate: Vec<f64>,
    pub put_cpu: Vec<f64>,
    pub get_cpu: Vec<f64>,
    pub mput_rate: Vec<f64>,
    pub mget_rate: Vec<f64>,
    pub cli_rate: Vec<f64>,
    pub failed: bool,
}

/// One run of workload 3 against one server: the library loop, then mput/mget if built.
/// Uploads go to fresh remote folders and downloads to fresh local ones (see above).
pub fn small_run(
    env: &Env,
    server: &ServerProc,
    lib: &Lib,
    small: &Small,
    series: &mut SmallSeries,
    run: usize,
) -> Result<()> {
    let n = small.names.len() as f64;
    let label = server.variant.label();
    let (put_to, mput_to) = (format!("loop-{run}"), format!("mput-{run}"));
    let loop_out = small.out.join(format!("{label}-loop-{run}"));
    let mget_out = small.out.join(format!("{label}-mget-{run}"));
    fs::create_dir_all(&loop_out)?;
    fs::create_dir_all(&mget_out)?;
    env.rt.block_on(async {
        let mut client = lib.client().await?;
        client.mkdir(&put_to, true).await?;
        client.mkdir(&mput_to, true).await?;
        client.quit().await?;
        anyhow::Ok(())
    })?;
    sync_disks();
    let cpu_before = server.cpu();
    let started = Instant::now();
    env.rt.block_on(async {
        let mut client = lib.client().await?;
        for name in &small.names {
            client
                .put(
                    &small.dir.join(name),
                    &format!("{put_to}/{name}"),
                    false,
                    &mut NoProgress,
                )
                .await?;
        }
        client.quit().await?;
        anyhow::Ok(())
    })?;
    series.put_rate.push(n / started.elapsed().as_secs_f64());
    series.put_cpu.push(server.cpu() - cpu_before);
    sync_disks();
    let cpu_before = server.cpu();
    let started = Instant::now();
    env.rt.block_on(async {
        let mut client = lib.client().await?;
        for name in &small.names {
            client
                .get(
                    &format!("{put_to}/{name}"),
                    &loop_out.join(name),
                    false,
                    &mut NoProgress,
                )
                .await?;
        }
        client.quit().await?;
        anyhow::Ok(())
    })?;
    series.get_rate.push(n / started.elapsed().as_secs_f64());
    series.get_cpu.push(server.cpu() - cpu_before);
    if small.mput {
        sync_disks();
        let mut cmd = server.cli("mput");
        cmd.current_dir(&small.dir)
            .args(["--to", &mput_to])
            .args(&small.names);
        let r = run_measured(cmd, &server.errlog())?;
        series.mput_rate.push(n / r.wall);
        sync_disks();
        let mut cmd = server.cli("mget");
        cmd.current_dir(&mget_out)
            .args(small.names.iter().map(|name| format!("{mput_to}/{name}")));
        let r = run_measured(cmd, &server.errlog())?;
        series.mget_rate.push(n / r.wall);
    }
    Ok(())
}

pub fn write_small(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(len as usize + 8);
    while (bytes.len() as u64) < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len as usize);
    fs::write(path, bytes)?;
    Ok(())
}

pub fn peers_small(
    env: &Env,
    peers: &Peers,
    dir: &Path,
    names: &[String],
    run: usize,
    rates: &mut BTreeMap<String, Vec<f64>>,
    report: &mut Report,
) {
    let n = names.len() as f64;
    // Fresh folders per run on both sides, deleted after the workload (see above).
    let outs = env.work.join("small-out-peer");
    let remote_name = format!("small-{run}");
    let _ = fs::create_dir_all(&outs);
    let mut record = |key: &str, result: Result<f64>, report: &mut Report| match result {
        Ok(secs) => rates.entry(key.into()).or_default().push(n / secs),
        Err(e) => report.fail(&format!("peer {key}"), &e),
    };
    if let Some(sftp) = &peers.sftp {
        let remote = sftp.data.join(&remote_name);
        let _ = fs::create_dir_all(&remote);
        sync_disks();
        let put = sftp.batch(&[format!("put {}/* {}/", dir.display(), remote.display())]);
        record("sftp mput", put.map(|r| r.wall), report);
        let out = outs.join(format!("sftp-{run}"));
        let _ = fs::create_dir_all(&out);
        sync_disks();
        let get = sftp.batch(&[format!("get {}/* {}/", remote.display(), out.display())]);
        record("sftp mget", get.map(|r| r.wall), report);
    }
    if let Some(rsync) = &peers.rsync {
        sync_disks();
        let put = rsync.run(&[
            "-r".into(),
            format!("{}/", dir.display()),
            format!("{}/{remote_name}/", rsync.url),
        ]);
        record("rsync mput", put.map(|r| r.wall), report);
        let out = outs.join(format!("rsync-{run}"));
        sync_disks();
        let get = rsync.run(&[
            "-r".into(),
            format!("{}/{remote_name}/", rsync.url),
            format!("{}/", out.display()),
        ]);
        record("rsync mget", get.map(|r| r.wall), report);
    }
    if let Some(dufs) = &peers.dufs {
        let (addr, d, nm) = (dufs.addr.clone(), dir.to_path_buf(), names.to_vec());
        let _ = fs::create_dir_all(dufs.data.join(&remote_name));
        let folder = remote_name.clone();
        sync_disks();
        let started = Instant::now();
        let put = env.rt.block_on(async {
            let mut http = Http::connect(&addr).await?;
            for name in &nm {
                http.put(&format!("/{folder}/{name}"), &d.join(name))
                    .await?;
            }
            anyhow::Ok(())
        });
        record(
            "dufs mput",
            put.map(|()| started.elapsed().as_secs_f64()),
            report,
        );
        let out = outs.join(format!("dufs-{run}"));
        let _ = fs::create_dir_all(&out);
        sync_disks();
        let (o, folder) = (out.clone(), remote_name.clone());
        let started = Instant::now();
        // A fresh connection per GET: on a kept-alive connection dufs stalls ~40 ms per
        // response (Nagle against delayed ACKs; curl sees the same), so this is its best.
        let get = env.rt.block_on(async {
            for name in &nm {
                let mut http = Http::connect(&addr).await?;
                http.get(&format!("/{folder}/{name}"), &o.join(name))
                    .await?;
            }
            anyhow::Ok(())
        });
        record(
            "dufs mget",
            get.map(|()| started.elapsed().as_secs_f64()),
            report,
        );
    }
}
