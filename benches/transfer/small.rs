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
    let small = Small {
        dir: dir.clone(),
        out: env.work.join("small-out"),
        names: names.clone(),
        mput,
    };
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
            if let Err(e) = small_run(env, server, lib, &small, series) {
                report.fail(&format!("workload 3 ({})", server.variant.label()), &e);
                series.failed = true;
            }
        }
        peers_small(env, peers, &dir, &names, &mut peer_rates, report);
    }
    // One `netdisk put` process per file, as a shell loop would do without mput.
    let k = s.cli_files.min(n);
    for (server, _, series) in servers.iter_mut() {
        if k == 0 || series.failed {
            continue;
        }
        sync_disks();
        let started = Instant::now();
        let result = names[..k].iter().try_for_each(|name| {
            let mut cmd = server.cli("put");
            cmd.arg(dir.join(name)).arg(name);
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
pub fn small_run(
    env: &Env,
    server: &ServerProc,
    lib: &Lib,
    small: &Small,
    series: &mut SmallSeries,
) -> Result<()> {
    let n = small.names.len() as f64;
    remove(&small.out);
    fs::create_dir_all(&small.out)?;
    sync_disks();
    let cpu_before = server.cpu();
    let started = Instant::now();
    env.rt.block_on(async {
        let mut client = lib.client().await?;
        for name in &small.names {
            client
                .put(&small.dir.join(name), name, false, &mut NoProgress)
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
                .get(name, &small.out.join(name), false, &mut NoProgress)
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
        cmd.current_dir(&small.dir).args(&small.names);
        let r = run_measured(cmd, &server.errlog())?;
        series.mput_rate.push(n / r.wall);
        remove(&small.out);
        fs::create_dir_all(&small.out)?;
        sync_disks();
        let mut cmd = server.cli("mget");
        cmd.current_dir(&small.out).args(&small.names);
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
    rates: &mut BTreeMap<String, Vec<f64>>,
    report: &mut Report,
) {
    let n = names.len() as f64;
    let out = env.work.join("small-out-peer");
    let mut record = |key: &str, result: Result<f64>, report: &mut Report| match result {
        Ok(secs) => rates.entry(key.into()).or_default().push(n / secs),
        Err(e) => report.fail(&format!("peer {key}"), &e),
    };
    if let Some(sftp) = &peers.sftp {
        let remote = sftp.data.join("small");
        let _ = fs::create_dir_all(&remote);
        sync_disks();
        let put = sftp.batch(&[format!("put {}/* {}/", dir.display(), remote.display())]);
        record("sftp mput", put.map(|r| r.wall), report);
        remove(&out);
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
            format!("{}/small/", rsync.url),
        ]);
        record("rsync mput", put.map(|r| r.wall), report);
        remove(&out);
        sync_disks();
        let get = rsync.run(&[
            "-r".into(),
            format!("{}/small/", rsync.url),
            format!("{}/", out.display()),
        ]);
        record("rsync mget", get.map(|r| r.wall), report);
    }
    if let Some(dufs) = &peers.dufs {
        let (addr, d, nm) = (dufs.addr.clone(), dir.to_path_buf(), names.to_vec());
        let _ = fs::create_dir_all(dufs.data.join("small"));
        sync_disks();
        let started = Instant::now();
        let put = env.rt.block_on(async {
            let mut http = Http::connect(&addr).await?;
            for name in &nm {
                http.put(&format!("/small/{name}"), &d.join(name)).await?;
            }
            anyhow::Ok(())
        });
        record(
            "dufs mput",
            put.map(|()| started.elapsed().as_secs_f64()),
            report,
        );
        remove(&out);
        let _ = fs::create_dir_all(&out);
        sync_disks();
        let o = out.clone();
        let started = Instant::now();
        // A fresh connection per GET: on a kept-alive connection dufs stalls ~40 ms per
        // response (Nagle against delayed ACKs; curl sees the same), so this is its best.
        let get = env.rt.block_on(async {
            for name in &nm {
                let mut http = Http::connect(&addr).await?;
                http.get(&format!("/small/{name}"), &o.join(name)).await?;
            }
            anyhow::Ok(())
        });
        record(
            "dufs mget",
            get.map(|()| started.elapsed().as_secs_f64()),
            report,
        );
    }
    remove(&out);
}
