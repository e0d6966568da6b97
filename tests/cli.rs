//! End to end through the command line, on images built by umoci and checked by skopeo
//! (Debian's packages; `.ci/run` installs them).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{fleetdelta, run, run_failing, text, tool, Bounded};
use fleetdelta::image::Layout;

fn write_tree(root: &Path, files: &[(&str, Vec<u8>)]) {
    for (path, data) in files {
        let p = root.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }
}

/// `img:base` (one layer), then `img:v1` and `img:v2` each adding an app layer on top of it;
/// v2's app is v1's with edits. Built with umoci, as a release pipeline would.
fn build_images(dir: &Path) {
    let img = dir.join("img");
    run(tool("umoci").args(["init", "--layout"]).arg(&img));
    run(tool("umoci").args(["new", "--image"]).arg(format!("{}:base", img.display())));
    let bundle = dir.join("bundle-base");
    run(tool("umoci").args(["unpack", "--rootless", "--image"]).arg(format!("{}:base", img.display())).arg(&bundle));
    write_tree(
        &bundle.join("rootfs"),
        &(0..40).map(|i| (Box::leak(format!("usr/lib/base/{i}.so").into_boxed_str()) as &str, text(i, 20_000))).collect::<Vec<_>>(),
    );
    run(tool("umoci").args(["repack", "--image"]).arg(format!("{}:base", img.display())).arg(&bundle));
    for (tag, edit) in [("v1", false), ("v2", true)] {
        let b = dir.join(format!("bundle-{tag}"));
        run(tool("umoci").args(["unpack", "--rootless", "--image"]).arg(format!("{}:base", img.display())).arg(&b));
        let mut files: Vec<(&str, Vec<u8>)> =
            (0..30).map(|i| (Box::leak(format!("app/module{i}.py").into_boxed_str()) as &str, text(1000 + i, 12_000))).collect();
        if edit {
            files[3].1.splice(500..600, text(9, 250));
            files[17].1.extend_from_slice(b"\ndef added():\n    return 2\n");
            files.push(("app/new_module.py", text(4242, 6000)));
            files.remove(25);
        }
        write_tree(&b.join("rootfs"), &files);
        run(tool("umoci").args(["repack", "--image"]).arg(format!("{}:{tag}", img.display())).arg(&b));
    }
}

fn skopeo_digest(reference: &str) -> String {
    let out = run(tool("skopeo").args(["inspect", "--format", "{{.Digest}}", reference]));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn umoci_images_round_trip_through_the_cli_and_the_delta_is_an_ordinary_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    build_images(d);
    let img = d.join("img");
    let (v1, v2) = (format!("oci:{}:v1", img.display()), format!("oci:{}:v2", img.display()));
    let delta = format!("oci:{}:v1-v2", d.join("delta").display());

    let out = run(fleetdelta().args(["diff", "--level", "default", &v1, &v2, &delta]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("to download instead of"));

    // skopeo reads the delta as any image and can copy it; umoci can unpack it.
    let delta_digest = skopeo_digest(&delta);
    assert!(delta_digest.starts_with("sha256:"));
    let copied = format!("oci:{}:copy", d.join("delta-copy").display());
    run(tool("skopeo").args(["copy", &delta, &copied]));
    assert_eq!(skopeo_digest(&copied), delta_digest, "skopeo copy keeps the delta bit for bit");
    run(tool("umoci").args(["unpack", "--rootless", "--image"]).arg(format!("{}:v1-v2", d.join("delta").display())).arg(d.join("delta-bundle")));
    let plan: serde_json::Value = serde_json::from_slice(&fs::read(d.join("delta-bundle/rootfs/delta.json")).unwrap()).unwrap();
    assert_eq!(plan["formatVersion"], 2);
    let patch = plan["layers"][1]["deltaLayer"].as_u64().unwrap();
    assert_eq!(patch, 0, "a small patch shares the metadata layer: {plan}");
    assert!(d.join("delta-bundle/rootfs/layer-0001.patch").is_file(), "umoci unpacks the patch with the metadata");

    // info, for people and as JSON.
    let out = run(fleetdelta().args(["info", &copied, "--json"]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    common::schema::assert_valid("info", &info);
    assert_eq!(info["layers"][0]["method"], "source");
    assert_eq!(info["layers"][1]["method"], "patch");
    assert_eq!(info["layers"][1]["encoding"]["kind"], "exact", "umoci writes with klauspost pgzip, which is re-encoded exactly");
    assert_eq!(info["layers"][1]["encoding"]["descriptor"]["encoder"]["kind"], "pgzip");
    assert!(info["payload_bytes"].as_u64().unwrap() < info["target_bytes"].as_u64().unwrap() / 4);
    run(fleetdelta().args(["info", &copied]));

    // Apply from the copy into a new layout and into the source's own layout.
    let out_ref = format!("oci:{}:v2", d.join("out").display());
    run(fleetdelta().args(["apply", &v1, &copied, &out_ref]));
    let inplace = format!("oci:{}:v2-rebuilt", img.display());
    let out = run(fleetdelta().args(["apply", "--json", &v1, &copied, &inplace]));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    common::schema::assert_valid("apply", &report);
    assert_eq!(report["layers"][0]["identical"], true);

    // The rebuilt image has the target's config and unpacks to the same tree.
    let config_of = |r: &str| {
        let out = run(tool("skopeo").args(["inspect", "--raw", r]));
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        m["config"]["digest"].as_str().unwrap().to_string()
    };
    assert_eq!(config_of(&out_ref), config_of(&v2));
    assert_eq!(config_of(&inplace), config_of(&v2));
    // Bit-exact: the rebuilt image is the registry's image, manifest digest included.
    assert_eq!(report["written_manifest"], report["target_manifest"], "{report}");
    assert_eq!(skopeo_digest(&out_ref), skopeo_digest(&v2));
    assert_eq!(skopeo_digest(&inplace), skopeo_digest(&v2));
    run(tool("umoci").args(["unpack", "--rootless", "--image"]).arg(format!("{}:v2", d.join("out").display())).arg(d.join("check-out")));
    run(tool("umoci").args(["unpack", "--rootless", "--image"]).arg(format!("{}:v2", img.display())).arg(d.join("check-v2")));
    run(Command::new("diff").arg("-r").arg(d.join("check-out/rootfs")).arg(d.join("check-v2/rootfs")));
    assert_eq!(skopeo_digest(&v1), skopeo_digest(&format!("oci:{}:v1", img.display())), "source untouched");

    // With uncompressed layers.
    let raw_ref = format!("oci:{}:v2", d.join("raw").display());
    run(fleetdelta().args(["apply", "--layers", "uncompressed", &v1, &delta, &raw_ref]));
    assert_eq!(config_of(&raw_ref), config_of(&v2));
}

/// `info --files` on the bundled sample pair (idna 3.6 -> 3.7 in its second layer): every
/// entry of the patched layer with what it costs, the costs adding up to the patch, the
/// changed modules costly and the unchanged ones copied; a wrong source refused by name.
#[test]
fn info_files_tells_where_each_patch_byte_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/sample");
    let (v1, v2) = (format!("oci:{}", sample.join("v1").display()), format!("oci:{}", sample.join("v2").display()));
    let delta = format!("oci:{}:d", tmp.path().join("delta").display());
    run(fleetdelta().args(["diff", "--quiet", &v1, &v2, &delta]));

    let out = run(fleetdelta().args(["--quiet", "info", &delta, "--files", "--source", &v1, "--json"]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    common::schema::assert_valid("info", &info);
    let layers = info["layers"].as_array().unwrap();
    assert!(layers.iter().all(|l| l["files"].is_null() == (l["method"] != "patch")), "files for patch layers only: {info:#}");
    let layer = layers.iter().find(|l| l["method"] == "patch").expect("a patched layer");
    let files = &layer["files"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));
    let entries = files["entries"].as_array().unwrap();
    let costs: u64 = entries.iter().map(|e| n(&e["cost_bytes"])).sum();
    assert_eq!(costs, n(&files["chunk_cost_bytes"]));
    assert_eq!(costs + n(&files["records_and_framing_bytes"]), n(&files["patch_bytes"]), "the costs share the patch: {files:#}");
    assert!(n(&files["patch_bytes"]) <= n(&layer["payload_bytes"]));
    let tar_bytes: u64 = entries.iter().flat_map(|e| ["contents", "header"].map(|p| e[p].as_object().unwrap().values().map(n).sum::<u64>())).sum();
    assert_eq!(tar_bytes, n(&layer["stats"]["tar_bytes"]), "every byte of the rebuilt tar counted once");
    assert_eq!(entries.last().unwrap()["kind"], "end-of-archive");
    let entry = |name: &str| {
        let path = format!("usr/local/lib/python3.11/dist-packages/idna/{name}");
        entries.iter().find(|e| e["path"] == path.as_str()).unwrap_or_else(|| panic!("no {path} in {files:#}"))
    };
    let changed = entry("idnadata.py");
    assert!(n(&changed["cost_bytes"]) > 0 && n(&changed["contents"]["literal_bytes"]) > 0, "{changed}");
    let unchanged = entry("uts46data.py");
    assert_eq!(n(&unchanged["size"]), 206_503);
    assert_eq!(n(&unchanged["contents"]["literal_bytes"]) + n(&unchanged["contents"]["added_bytes"]), 0, "{unchanged}");
    assert!(n(&changed["cost_bytes"]) > n(&unchanged["cost_bytes"]));

    // For people: the costliest file first, and where the rest goes.
    let out = run(fleetdelta().args(["--quiet", "info", &delta, "--files", "--source", &v1, "--top", "3"]));
    let text = String::from_utf8(out.stdout).unwrap();
    let listed: Vec<&str> = text.lines().skip_while(|l| !l.contains("by file (estimated")).skip(2).take(3).collect();
    assert!(listed[0].ends_with("idna/idnadata.py"), "{text}");
    assert!(text.contains("more entries") && text.contains("tar headers and padding") && text.contains("records and framing"), "{text}");

    // The target is not the source; --files needs a source.
    let err = run_failing(fleetdelta().args(["info", &delta, "--files", "--source", &v2]));
    let digest = |k: &str| info[k].as_str().unwrap().to_string();
    assert!(err.contains("not the one this delta was made against"), "{err}");
    assert!(err.contains(&digest("target_config")) && err.contains(&digest("source_config")), "both configs named: {err}");
    let out = fleetdelta().args(["info", &delta, "--files"]).output_bounded();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--source"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn failures_exit_non_zero_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("oci:{}", dir.path().join("missing").display());
    let out = fleetdelta().args(["apply", &missing, &missing, &format!("oci:{}", dir.path().join("o").display())]).output_bounded();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("fleetdelta: error:") && stderr.contains("missing"), "{stderr}");
    assert!(!dir.path().join("o").exists());

    let out = fleetdelta().args(["diff", "docker://example/a:1", "oci:x", "oci:y"]).output_bounded();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("docker://"));
}

/// A reader that closes the pipe early (`fleetdelta … | head -1`) ends the command quietly,
/// with the status a process killed by SIGPIPE has, never a panic; the command's work is done.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/sample");
    for (args, json) in [(vec!["copy", "--json"], true), (vec!["info"], false)] {
        let source = format!("oci:{}:latest", sample.join("v1").display());
        let dest = format!("oci:{}:copy", tmp.path().join(args[0]).display());
        let mut cmd = fleetdelta();
        cmd.arg("--quiet").args(&args);
        if args[0] == "copy" {
            cmd.args([&source, &dest]);
        } else {
            let delta = format!("oci:{}:d", tmp.path().join("delta").display());
            run(fleetdelta().args(["diff", "--quiet", &source, &format!("oci:{}:latest", sample.join("v2").display()), &delta]));
            cmd.arg(&delta);
        }
        let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?} (json: {json}): {stderr}");
        assert!(!stderr.contains("panicked") && stderr.is_empty(), "{args:?}: {stderr}");
    }
    assert!(Layout::open(tmp.path().join("copy")).unwrap().load_image(Some("copy")).is_ok(), "the copy was made");
}

/// On a terminal, each stage shows its name, bytes done of its total and the rate; off a
/// terminal, stderr carries no escape codes at all. The terminal is a pseudo-terminal from
/// util-linux's `script`.
#[test]
fn progress_shows_stages_bytes_and_rate_on_a_terminal_only() {
    let tmp = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/sample");
    let (v1, v2) = (format!("oci:{}", sample.join("v1").display()), format!("oci:{}", sample.join("v2").display()));
    let delta = format!("oci:{}:d", tmp.path().join("delta").display());
    let command = format!("{} diff {v1} {v2} {delta}", env!("CARGO_BIN_EXE_fleetdelta"));
    let out = run(tool("script").args(["-qec", &command, "/dev/null"]));
    let screen = String::from_utf8_lossy(&out.stdout);
    for stage in ["unpacking layers", "encoding layers"] {
        let line =
            screen.split(['\r', '\n']).find(|l| l.contains(stage) && l.contains(" / ")).unwrap_or_else(|| panic!("no {stage} bar with bytes: {screen:?}"));
        assert!(line.contains("KiB") && line.contains("/s"), "bytes and rate: {line:?}");
    }
    let quiet = run(fleetdelta().args(["diff", &v1, &v2, &format!("oci:{}:e", tmp.path().join("delta").display())]));
    assert!(!quiet.stderr.contains(&0x1b) && !quiet.stdout.contains(&0x1b), "escape codes off a terminal: {:?}", String::from_utf8_lossy(&quiet.stderr));
}
