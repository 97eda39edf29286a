//! Workload 5: login

#[allow(unused_imports)]
use crate::prelude::*;

pub fn workload_login(env: &Env, s: &Settings, report: &mut Report) -> Result<()> {
    let w = "5 login";
    for &variant in &env.variants {
        let label = variant.label();
        let result = (|| -> Result<()> {
            let mut server = ServerProc::start(env, &format!("w5-{label}"), variant, 64)?;
            server.add_user(&env.rt, s.iterations)?;
            let iterations = s.iterations;
            let (mut wall, mut client_cpu) = (vec![], vec![]);
            // The server's CPU clock ticks in 10 ms: take the mean over all logins.
            let server_before = server.cpu();
            for _ in 0..s.logins {
                let mut cmd = server.cli("login");
                cmd.arg(USER);
                let (r, _, _) = measured_cli(&server, cmd)?;
                wall.push(r.wall * 1e3);
                client_cpu.push(r.cpu * 1e3);
            }
            let server_cpu = vec![(server.cpu() - server_before) * 1e3 / s.logins as f64];
            let v = format!("{label}, {iterations} iter");
            report.row(w, &v, "`netdisk login` wall", "ms", wall);
            report.row(w, &v, "client CPU per login", "ms", client_cpu);
            report.row(w, &v, "server CPU per login (mean)", "ms", server_cpu);
            Ok(())
        })();
        if let Err(e) = result {
            report.fail(&format!("workload 5 ({label})"), &e);
        }
    }
    Ok(())
}
