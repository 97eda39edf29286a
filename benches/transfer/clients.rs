//! Workload 4: many clients: idle then ls; concurrent puts

#[allow(unused_imports)]
use crate::prelude::*;

pub fn workload_clients(env: &Env, s: &Settings, peers: &Peers, report: &mut Report) -> Result<()> {
    let n = s.idle_clients.max(s.many_idle_clients);
    let limit = raise_fd_limit((n + s.concurrent) as u64 + 256);
    if limit < (n + s.concurrent) as u64 + 64 {
        report.note(format!(
            "open-files limit {limit} may be too low for {n} clients"
        ));
    }
    // Something to list: 16 small files.
    let dir = env.work.join("w4-files");
    fs::create_dir_all(&dir)?;
    for i in 0..16u64 {
        write_small(&dir.join(format!("listed-{i:02}.bin")), 4096, i + 100)?;
    }
    let src = env.work.join("src").join("concurrent.bin");
    fs::create_dir_all(src.parent().expect("has a parent"))?;
    write_random_file(&src, s.concurrent_size, 3)?;
    for (i, &variant) in env.variants.iter().enumerate() {
        // dufs is measured once, next to the first variant.
        let dufs = if i == 0 { peers.dufs.as_ref() } else { None };
        if let Err(e) = clients_variant(env, s, variant, dufs, &dir, &src, report) {
            report.fail(&format!("workload 4 ({})", variant.label()), &e);
        }
        if s.many_idle_clients > 0 {
            if let Err(e) = many_idle(env, s, variant, &dir, report) {
                report.fail(&format!("workload 4 ({}, many idle)", variant.label()), &e);
            }
        }
    }
    Ok(())
}

/// A server with 16 files to list, ready for in-process clients.
pub fn listing_server(
    env: &Env,
    s: &Settings,
    variant: Variant,
    name: &str,
    dir: &Path,
) -> Result<(ServerProc, Lib)> {
    let max_connections = s.idle_clients.max(s.many_idle_clients) + s.concurrent + 16;
    let mut server = ServerProc::start(env, name, variant, max_connections)?;
    server.add_user(&env.rt, s.iterations)?;
    let lib = server.lib()?;
    for i in 0..16u64 {
        let mut cmd = server.cli("put");
        cmd.arg(dir.join(format!("listed-{i:02}.bin")));
        run_measured(cmd, &server.errlog())?;
    }
    Ok((server, lib))
}

pub fn clients_variant(
    env: &Env,
    s: &Settings,
    variant: Variant,
    dufs: Option<&Dufs>,
    dir: &Path,
    src: &Path,
    report: &mut Report,
) -> Result<()> {
    let w = "4 many clients";
    let label = variant.label();
    let n = s.idle_clients;
    let (mut rss_base, mut rss_idle, mut rss_after, mut per_client) =
        (vec![], vec![], vec![], vec![]);
    let (mut seq_p50, mut seq_p99, mut burst_p50, mut burst_p99) = (vec![], vec![], vec![], vec![]);
    let mut connect_rate = vec![];
    // What the burst costs in CPU, each side: with both on the same 2 cores, half their
    // sum is the shortest the burst can take.
    let (mut burst_server_cpu, mut burst_client_cpu, mut burst_wall) = (vec![], vec![], vec![]);
    for run in 0..s.runs {
        eprintln!(
            "workload 4 ({label}): run {}/{}: {n} idle clients",
            run + 1,
            s.runs
        );
        // A fresh server each run: memory a process once had is not given back, so a
        // second run on the same server would start from the first one's high-water mark.
        let (server, lib) = listing_server(env, s, variant, &format!("w4-{label}-{run}"), dir)?;
        std::thread::sleep(Duration::from_millis(300));
        let base = server.rss_mib();
        let started = Instant::now();
        let clients = env.rt.block_on(connect_many(&lib, n))?;
        connect_rate.push(n as f64 / started.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(1000));
        let idle = server.rss_mib();
        // Each client in turn, then all at once.
        let (clients, sequential) = env.rt.block_on(ls_each(clients))?;
        let server_cpu = proc_cpu_secs_fine(server.pid());
        let client_cpu = self_cpu_secs();
        let (clients, burst) = env.rt.block_on(ls_burst(clients))?;
        burst_server_cpu
            .push((proc_cpu_secs_fine(server.pid()) - server_cpu) * 1e6 / n.max(1) as f64);
        burst_client_cpu.push((self_cpu_secs() - client_cpu) * 1e6 / n.max(1) as f64);
        burst_wall.push(burst.iter().copied().fold(0.0, f64::max));
        let after = server.rss_mib();
        env.rt.block_on(async move {
            for client in clients {
                let _ = client.quit().await;
            }
        });
        rss_base.push(base);
        rss_idle.push(idle);
        rss_after.push(after);
        per_client.push((idle - base) * 1024.0 / n.max(1) as f64);
        seq_p50.push(percentile(&sequential, 0.5));
        seq_p99.push(percentile(&sequential, 0.99));
        burst_p50.push(percentile(&burst, 0.5));
        burst_p99.push(percentile(&burst, 0.99));
    }
    let v = format!("{label}, {n} clients");
    report.row(w, &v, "server RSS before", "MiB", rss_base);
    report.row(w, &v, "server RSS idle", "MiB", rss_idle);
    report.row(w, &v, "server RSS per idle client", "KiB", per_client);
    report.row(w, &v, "connect+login rate", "clients/s", connect_rate);
    report.row(w, &v, "ls p50, one at a time", "ms", seq_p50);
    report.row(w, &v, "ls p99, one at a time", "ms", seq_p99);
    report.row(w, &v, "ls p50, all at once", "ms", burst_p50);
    report.row(w, &v, "ls p99, all at once", "ms", burst_p99);
    report.row(w, &v, "ls burst: slowest", "ms", burst_wall);
    report.row(w, &v, "ls burst: server CPU per ls", "µs", burst_server_cpu);
    report.row(
        w,
        &v,
        "ls burst: harness CPU per ls",
        "µs",
        burst_client_cpu,
    );
    report.row(w, &v, "server RSS after ls", "MiB", rss_after);

    // Concurrent puts: one server for all runs (the peak is reset before each).
    let c = s.concurrent;
    let (server, lib) = listing_server(env, s, variant, &format!("w4-{label}-puts"), dir)?;
    let (mut aggregate, mut peak, mut cpu, mut harness_cpu) = (vec![], vec![], vec![], vec![]);
    let (mut dufs_aggregate, mut dufs_peak) = (vec![], vec![]);
    let total = s.concurrent_size * c as u64;
    for run in 0..s.runs {
        eprintln!(
            "workload 4 ({label}): run {}/{}: {c} clients putting {} MiB each",
            run + 1,
            s.runs,
            s.concurrent_size / MIB
        );
        sync_disks();
        server.reset_peak();
        let (cpu_before, harness_before) = (server.cpu(), self_cpu_secs());
        let secs = env.rt.block_on(concurrent_puts(&lib, src, c))?;
        aggregate.push(mb_per_s(total, secs));
        cpu.push(server.cpu() - cpu_before);
        // The clients' side (reading, hashing, TLS) shares the same 2 cores.
        harness_cpu.push(self_cpu_secs() - harness_before);
        peak.push(server.peak_rss_mib());
        if let Some(dufs) = dufs {
            sync_disks();
            let _ = fs::write(format!("/proc/{}/clear_refs", dufs.pid()), "5");
            match env.rt.block_on(concurrent_http_puts(&dufs.addr, src, c)) {
                Ok(secs) => {
                    dufs_aggregate.push(mb_per_s(total, secs));
                    dufs_peak.push(proc_status_mib(dufs.pid(), "VmHWM:"));
                }
                Err(e) => report.fail("peer dufs concurrent put", &e),
            }
        }
    }
    report.yardstick("dufs concurrent put", &dufs_aggregate);
    let v = format!("{label}, {c} x {} MiB", s.concurrent_size / MIB);
    report
        .row(w, &v, "concurrent put, aggregate", "MB/s", aggregate)
        .compare
        .push(("dufs", "dufs concurrent put".into()));
    report.row(w, &v, "concurrent put server CPU", "s", cpu);
    report.row(w, &v, "concurrent put harness CPU", "s", harness_cpu);
    report.row(w, &v, "concurrent put server peak RSS", "MiB", peak);
    if !dufs_aggregate.is_empty() {
        report.row(
            w,
            &format!("dufs, {c} x {} MiB", s.concurrent_size / MIB),
            "concurrent put, aggregate",
            "MB/s",
            dufs_aggregate,
        );
        report.row(
            w,
            &format!("dufs, {c} x {} MiB", s.concurrent_size / MIB),
            "concurrent put server peak RSS",
            "MiB",
            dufs_peak,
        );
    }
    Ok(())
}

/// `--many-idle-clients` logged-in clients doing nothing, once (a fresh server): the
/// server's memory per idle client at that scale.
pub fn many_idle(
    env: &Env,
    s: &Settings,
    variant: Variant,
    dir: &Path,
    report: &mut Report,
) -> Result<()> {
    let (w, label) = ("4 many clients", variant.label());
    // The server serves what its descriptors allow (4 per connection, `limits.rs`); its
    // hard limit is ours (same user, same machine).
    let fit = ((hard_fd_limit().saturating_sub(64) / 4) as usize).saturating_sub(s.concurrent + 16);
    let n = s.many_idle_clients.min(fit);
    if n < s.many_idle_clients {
        report.note(format!(
            "{} idle clients do not fit the open-files hard limit (4 per connection): \
             measured {n}",
            s.many_idle_clients
        ));
    }
    eprintln!("workload 4 ({label}): {n} idle clients");
    let (server, lib) = listing_server(env, s, variant, &format!("w4-{label}-many"), dir)?;
    std::thread::sleep(Duration::from_millis(300));
    let base = server.rss_mib();
    let started = Instant::now();
    let clients = env.rt.block_on(connect_many(&lib, n))?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(1000));
    let idle = server.rss_mib();
    let (clients, burst) = env.rt.block_on(ls_burst(clients))?;
    env.rt.block_on(async move {
        for client in clients {
            let _ = client.quit().await;
        }
    });
    let v = format!("{label}, {n} clients");
    report.row(w, &v, "server RSS idle", "MiB", vec![idle]);
    report.row(
        w,
        &v,
        "server RSS per idle client",
        "KiB",
        vec![(idle - base) * 1024.0 / n.max(1) as f64],
    );
    report.row(w, &v, "connect+login rate", "clients/s", vec![rate]);
    report.row(
        w,
        &v,
        "ls p99, all at once",
        "ms",
        vec![percentile(&burst, 0.99)],
    );
    Ok(())
}

pub async fn connect_many(lib: &Lib, n: usize) -> Result<Vec<Client>> {
    // At most 64 handshakes in flight, so the listen backlog never overflows.
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (lib, gate) = (lib.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            lib.client().await
        });
    }
    let mut clients = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        clients.push(joined??);
    }
    Ok(clients)
}

/// `ls` on each client in turn: latencies in ms.
pub async fn ls_each(mut clients: Vec<Client>) -> Result<(Vec<Client>, Vec<f64>)> {
    let mut latencies = Vec::with_capacity(clients.len());
    for client in &mut clients {
        let started = Instant::now();
        client.list().await?;
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok((clients, latencies))
}

/// `ls` on all clients at once (released together): latencies in ms.
pub async fn ls_burst(clients: Vec<Client>) -> Result<(Vec<Client>, Vec<f64>)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(clients.len() + 1));
    let mut tasks = Vec::with_capacity(clients.len());
    for mut client in clients {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let started = Instant::now();
            client.list().await?;
            anyhow::Ok((client, started.elapsed().as_secs_f64() * 1e3))
        }));
    }
    barrier.wait().await;
    let mut clients = Vec::with_capacity(tasks.len());
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (client, ms) = task.await??;
        clients.push(client);
        latencies.push(ms);
    }
    Ok((clients, latencies))
}

/// `c` clients (connected and logged in beforehand) put `src` at once, each under its
/// own name. Returns the seconds from the start until the last one is done.
pub async fn concurrent_puts(lib: &Lib, src: &Path, c: usize) -> Result<f64> {
    let clients = connect_many(lib, c).await?;
    let barrier = Arc::new(tokio::sync::Barrier::new(c + 1));
    let mut tasks = Vec::with_capacity(c);
    for (i, mut client) in clients.into_iter().enumerate() {
        let (barrier, src) = (barrier.clone(), src.to_path_buf());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            client
                .put(
                    &src,
                    &format!("concurrent-{i:04}.bin"),
                    false,
                    &mut NoProgress,
                )
                .await?;
            client.quit().await?;
            anyhow::Ok(())
        }));
    }
    barrier.wait().await;
    let started = Instant::now();
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

pub async fn concurrent_http_puts(addr: &str, src: &Path, c: usize) -> Result<f64> {
    let mut conns = Vec::with_capacity(c);
    for _ in 0..c {
        conns.push(Http::connect(addr).await?);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(c + 1));
    let mut tasks = Vec::with_capacity(c);
    for (i, mut http) in conns.into_iter().enumerate() {
        let (barrier, src) = (barrier.clone(), src.to_path_buf());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            http.put(&format!("/concurrent-{i:04}.bin"), &src).await
        }));
    }
    barrier.wait().await;
    let started = Instant::now();
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}
