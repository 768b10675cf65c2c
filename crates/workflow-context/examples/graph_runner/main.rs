//! Pass-by-value beside pass-by-reference.
//!
//! A client saves an image by value and an "upscaled image" by reference: the workflow
//! graph that makes it. A second process (this program again, as the server) attaches,
//! loads the first as bytes and rebuilds the second by running its graph with a toy
//! runner; a second load reuses the rebuilt value instead of running the graph again.
//!
//! Run it with `cargo run -p workflow-context --example graph_runner`.

mod toy;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use toy::{Image, ToyRunner};
use workflow_context::{Result, SaveOptions, WorkflowContext, WorkflowGraph};

const GRAPH: &str = r#"{
    "1": {"class_type": "SyntheticImage", "inputs": {"width": 64, "height": 48, "seed": 7}},
    "2": {"class_type": "Constant", "inputs": {"value": 128}},
    "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 128}},
    "4": {"class_type": "Resize", "inputs": {"image": ["1", 0], "width": ["3", 0], "height": 192}}
}"#;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, run_id, base] = args.as_slice()
        && flag == "--server"
    {
        return server(run_id, base);
    }
    let base = std::env::temp_dir().join("workflow-context-graph-example");
    let ctx = WorkflowContext::builder().contexts_dir(&base).create()?;
    ctx.save_bytes("input_image", &vec![9u8; 64 * 48 * 3], SaveOptions::new())?;
    let graph = WorkflowGraph::from_json(GRAPH)?;
    ctx.save_ref("upscaled", &graph)?;
    for key in ["input_image", "upscaled"] {
        let info = ctx.storage_info(key)?.expect("saved");
        println!("client: {key:<12} pass-by-{:?}, {} tier, {} bytes stored", info.pass_by, info.tier, info.len);
    }
    let status = Command::new(std::env::current_exe().expect("own path"))
        .args(["--server", ctx.run_id(), &base.display().to_string()])
        .status()
        .expect("start the server");
    assert!(status.success(), "the server failed");
    Ok(())
}

fn server(run_id: &str, base: &str) -> Result<()> {
    let runner = Arc::new(ToyRunner::default());
    let ctx = WorkflowContext::builder().contexts_dir(base).run_id(run_id).graph_runner(runner.clone()).open()?;
    let input = ctx.load_bytes("input_image")?;
    println!("server: input_image by value: {} bytes, read from shared memory", input.len());
    println!(
        "server: upscaled's recipe has {} nodes; output node {:?}",
        ctx.load_graph("upscaled")?.nodes().len(),
        ctx.load_graph("upscaled")?.output()
    );
    let image: Arc<Image> = futures::executor::block_on(ctx.load_ref("upscaled"))?;
    println!("server: rebuilt upscaled by running its graph: a {}x{} image", image.width, image.height);
    let again: Arc<Image> = futures::executor::block_on(ctx.load_ref("upscaled"))?;
    assert!(Arc::ptr_eq(&image, &again));
    println!("server: loaded it again: same value, graph runs so far: {}", runner.runs.load(Ordering::SeqCst));
    Ok(())
}
