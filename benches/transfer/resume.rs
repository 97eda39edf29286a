//! Workload 2: a get resumed after a cut at half

#[allow(unused_imports)]
use crate::prelude::*;

pub fn workload_resume(env: &Env, s: &Settings, report: &mut Report) -> Result<()> {
    let w = "2 resumed get";
    let size = s.size;
    let src = env.work.join("src").join("big.bin");
    if fs::metadata(&src).map(|m| m.len()).ok() != Some(size) {
        fs::create_dir_all(src.parent().expect("has a parent"))?;
        write_random_file(&src, size, 1)?;
    }
    let out = env.work.join("out");
    fs::create_dir_all(&out)?;
    // The local copy a download cut at half leaves behind: the first half of the file.
    let half = size / 2;
    let partial = env.work.join("src").join("half.bin");
    std::io::copy(
        &mut File::open(&src)?.take(half),
        &mut File::create(&partial)?,
    )?;

    for &variant in &env.variants {
        let label = variant.label();
        let result = (|| -> Result<()> {
            let mut server = ServerProc::start(env, &format!("w2-{label}"), variant, 64)?;
            server.add_user(&env.rt, s.iterations)?;
            let mut cmd = server.cli("put");
            cmd.arg(&src).arg("big.bin");
            run_measured(cmd, &server.errlog())?;
            let target = out.join("resume.bin");
            let (mut full_secs, mut resumed_secs, mut sent, mut full_sent) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for run in 0..s.runs {
                eprintln!("workload 2 ({label}): run {}/{}", run + 1, s.runs);
                remove(&target);
                let mut cmd = server.cli("get");
                cmd.arg("big.bin").arg(&target);
                let (r, _, _) = measured_cli(&server, cmd)?;
                full_secs.push(r.wall);
                full_sent.push(
                    server
                        .last_get_bytes()
                        .map_or(f64::NAN, |b| b as f64 / MIB as f64),
                );
                fs::copy(&partial, &target)?;
                let mut cmd = server.cli("get");
                cmd.arg("big.bin").arg(&target).arg("--resume");
                let (r, _, _) = measured_cli(&server, cmd)?;
                resumed_secs.push(r.wall);
                sent.push(
                    server
                        .last_get_bytes()
                        .map_or(f64::NAN, |b| b as f64 / MIB as f64),
                );
                if fs::metadata(&target)?.len() != size {
                    bail!("the resumed get did not produce the whole file");
                }
            }
            remove(&target);
            let ratio: Vec<f64> = resumed_secs
                .iter()
                .zip(&full_secs)
                .map(|(r, f)| r / f)
                .collect();
            report.row(w, label, "full get time", "s", full_secs);
            report.row(w, label, "full get body sent", "MiB", full_sent);
            report.row(w, label, "resumed get time", "s", resumed_secs);
            report.row(w, label, "resumed get body sent", "MiB", sent);
            report.row(w, label, "resumed / full time", "ratio", ratio);
            Ok(())
        })();
        if let Err(e) = result {
            report.fail(&format!("workload 2 ({label})"), &e);
        }
    }
    Ok(())
}
