//! Generates the protobuf messages and ttrpc async client/server for
//! `protos/*.proto` into OUT_DIR (pure Rust, no protoc).

use std::path::Path;

fn main() {
    let protos = ["protos/health.proto", "protos/agent.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = std::env::var("OUT_DIR").expect("OUT_DIR set by cargo");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(protos)
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("ttrpc code generation failed");

    // The generated files start with inner attributes (`#![...]`, `//!`),
    // which `include!` does not accept: strip them.
    for entry in std::fs::read_dir(&out).expect("read OUT_DIR") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        strip_inner_attrs(&path);
    }
}

fn strip_inner_attrs(path: &Path) {
    let text = std::fs::read_to_string(path).expect("read generated file");
    let cleaned: String = text
        .lines()
        .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, cleaned).expect("write generated file");
}
