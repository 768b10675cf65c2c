//! The main job: a client and a server process share one workflow context.
//!
//! The client creates a context with a small RAM budget (8 MiB), saves a prompt, the
//! sampler settings and a 1080p RGB frame, then starts a second process (this same
//! program, as the "server") that attaches to the context by run id, reads the inputs,
//! renders an output frame and saves it. The output does not fit in what is left of the
//! budget, so it spills to disk. The client then reads everything back and prints where
//! each value lives and what the context holds.
//!
//! Run it with `cargo run --release -p workflow-context --example two_processes`.

use std::process::Command;

use serde::{Deserialize, Serialize};
use workflow_context::{Result, SaveOptions, WorkflowContext};

const WIDTH: usize = 1920;
const HEIGHT: usize = 1080;

#[derive(Debug, Serialize, Deserialize)]
struct Sampler {
    seed: u64,
    steps: u32,
    cfg: f32,
    name: String,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--server") => server(&args[2], &args[3]),
        _ => client(),
    }
}

fn client() -> Result<()> {
    let base = std::env::temp_dir().join("workflow-context-example");
    let ctx = WorkflowContext::builder().contexts_dir(&base).max_ram_bytes(8 << 20).create()?;
    println!("client  (pid {}): created context {} in {}", std::process::id(), ctx.run_id(), ctx.dir().display());

    ctx.save("prompt", "a lighthouse at dusk, volumetric fog")?;
    ctx.save("sampler", &Sampler { seed: 1234, steps: 30, cfg: 7.5, name: "euler_a".into() })?;
    let frame: Vec<u8> = (0..WIDTH * HEIGHT * 3).map(|i| (i % 256) as u8).collect();
    ctx.save_bytes("input_image", &frame, SaveOptions::new())?;
    println!(
        "client: saved prompt, sampler and a {WIDTH}x{HEIGHT} RGB frame ({:.1} MiB)",
        frame.len() as f64 / (1 << 20) as f64
    );

    let exe = std::env::current_exe().expect("the example knows its own path");
    let status = Command::new(exe)
        .args(["--server", ctx.run_id(), &base.display().to_string()])
        .status()
        .expect("start the server process");
    assert!(status.success(), "the server process failed");

    let output = ctx.load_bytes("output_image")?;
    assert!(output.iter().zip(&frame).all(|(o, i)| *o == 255 - *i), "the server inverted the frame");
    println!("client: read the server's output ({:.1} MiB, zero-copy)", output.len() as f64 / (1 << 20) as f64);
    println!();
    println!("{:<14} {:<5} {:<5} {:>10} {:>10}  location", "key", "where", "tier", "length", "held");
    for key in ctx.list_keys()? {
        let info = ctx.storage_info(&key)?.expect("listed keys exist");
        let location =
            info.shm_name.clone().or_else(|| info.path.as_ref().map(|p| p.display().to_string())).unwrap_or_default();
        let kind = format!("{:?}", info.storage_type);
        println!("{key:<14} {kind:<5} {:<5} {:>10} {:>10}  {location}", info.tier, info.len, info.size);
    }
    let usage = ctx.usage()?;
    println!();
    println!(
        "usage: RAM {:.2} of {:.2} MiB, disk {:.2} MiB, {} keys",
        usage.ram_usage_bytes as f64 / (1 << 20) as f64,
        usage.ram_capacity_bytes as f64 / (1 << 20) as f64,
        usage.temp_disk_usage_mb(),
        usage.stored_keys_count
    );
    ctx.shutdown()?;
    println!("client: shut the context down; {} is gone: {}", ctx.dir().display(), !ctx.dir().exists());
    Ok(())
}

fn server(run_id: &str, base: &str) -> Result<()> {
    let ctx = WorkflowContext::builder().contexts_dir(base).run_id(run_id).open()?;
    let prompt: String = ctx.load("prompt")?;
    let sampler: Sampler = ctx.load("sampler")?;
    let input = ctx.load_bytes("input_image")?;
    println!("server  (pid {}): attached to {run_id}; rendering {prompt:?} with {sampler:?}", std::process::id());
    let output: Vec<u8> = input.iter().map(|b| 255 - b).collect();
    ctx.save_bytes("output_image", &output, SaveOptions::new())?;
    let info = ctx.storage_info("output_image")?.expect("just saved");
    println!("server: saved output_image: {:?} ({} tier): the RAM budget was full", info.storage_type, info.tier);
    Ok(())
}
