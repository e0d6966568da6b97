"""One comparison on one pair: fleetdelta diff and apply at each level (and at content
fidelity), verified; the peers on the concatenated uncompressed layer tars; the baselines
(pull the new layers, pull all layers, zstd -19 of NEW). `compare_pair` returns the pair's
info and its `Row`s."""

import json
import os
import shutil
import subprocess
import tempfile

from .common import (CompareError, Row, concat_layers, dir_bytes, log, measure, read_image,
                     verify_image)
from .peers import PEERS, run_peer

LEVELS = ("fast", "default", "max")
# Extra fleetdelta runs: (level, fidelity). "content" keeps diff_ids only; beside "default"
# (exact blobs) it shows what bit-exactness costs in payload and apply time.
VARIANTS = tuple((level, "exact") for level in LEVELS) + (("default", "content"),)


def run_fleetdelta(pair, exe, level, fidelity, v1, v2, work, timeout):
    name = f"fleetdelta-{level}" if fidelity == "exact" else f"fleetdelta-{level}-{fidelity}"
    row = Row(pair, name, "fleetdelta")
    delta, out = os.path.join(work, f"{name}-delta"), os.path.join(work, f"{name}-out")
    for p in (delta, out):
        shutil.rmtree(p, ignore_errors=True)
    measure([[exe, "diff", "--level", level, "--fidelity", fidelity, "--quiet", f"oci:{v1}",
              f"oci:{v2}", f"oci:{delta}"]], timeout, row.diff)
    if not row.diff.ok:
        row.note = row.diff.error
        return row
    row.payload = dir_bytes(os.path.join(delta, "blobs"))
    info = subprocess.run([exe, "info", f"oci:{delta}", "--json"], capture_output=True, text=True)
    if info.returncode == 0:
        try:
            reported = json.loads(info.stdout).get("payload_bytes")
            if isinstance(reported, int):
                row.payload = reported
        except ValueError:
            pass
    row.apply = measure([[exe, "apply", "--quiet", f"oci:{v1}", f"oci:{delta}", f"oci:{out}"]],
                        timeout)
    if not row.apply.ok:
        row.verified = False
        row.note = row.apply.error
    else:
        row.verified, row.note = verify_image(out, v2)
    for p in (delta, out):
        shutil.rmtree(p, ignore_errors=True)
    return row


def baselines(pair, v1, v2, new, work, timeout):
    src, _ = read_image(v1)
    dst, _ = read_image(v2)
    have = {d["digest"] for d in src["layers"]}
    missing = Row(pair, "pull-new-layers", "baseline")
    missing.payload = sum(d["size"] for d in dst["layers"] if d["digest"] not in have)
    missing.note = f"{sum(1 for d in dst['layers'] if d['digest'] not in have)}/{len(dst['layers'])} layers"
    full = Row(pair, "pull-all-layers", "baseline")
    full.payload = sum(d["size"] for d in dst["layers"])
    z = Row(pair, "zstd-19-full", "baseline")
    path = os.path.join(work, "full.zst")
    measure([["zstd", "-19", "-q", "-f", "--long=31", new, "-o", path]], timeout, z.diff)
    if z.diff.ok:
        z.payload = os.path.getsize(path)
        os.remove(path)
    else:
        z.note = z.diff.error
    return [missing, full, z]


def compare_pair(name, pairs_dir, args):
    v1, v2 = (os.path.abspath(os.path.join(pairs_dir, name, v)) for v in ("v1", "v2"))
    for v in (v1, v2):
        if not os.path.exists(os.path.join(v, "index.json")):
            raise CompareError(f"{v} is not an OCI layout (build it: tools/build-corpus {name})")
    work = tempfile.mkdtemp(prefix=f"compare-{name}-", dir=args.work_dir)
    rows = []
    try:
        info = {"pair": name,
                "v1_compressed": dir_bytes(os.path.join(v1, "blobs")),
                "v2_compressed": dir_bytes(os.path.join(v2, "blobs"))}
        if args.fleetdelta_exe:
            for level, fidelity in VARIANTS:
                log(f"{name}: fleetdelta --level {level} --fidelity {fidelity}")
                rows.append(run_fleetdelta(name, args.fleetdelta_exe, level, fidelity, v1, v2,
                                           work, args.timeout))
        old, new = os.path.join(work, "OLD"), os.path.join(work, "NEW")
        info["old_bytes"] = concat_layers(v1, old)
        info["new_bytes"] = concat_layers(v2, new)
        for tool in PEERS:
            if tool in args.skip_peer:
                continue
            if tool == "bsdiff" and args.bsdiff_max_mb and \
                    info["new_bytes"] > args.bsdiff_max_mb * 1e6:
                log(f"{name}: bsdiff skipped (NEW over --bsdiff-max-mb {args.bsdiff_max_mb})")
                skipped = Row(name, tool, "peer")
                skipped.diff.status = "skipped"
                skipped.note = f"skipped: NEW over {args.bsdiff_max_mb} MB (--bsdiff-max-mb)"
                rows.append(skipped)
                continue
            log(f"{name}: {tool}")
            rows.append(run_peer(name, tool, old, new, work, args.timeout))
        log(f"{name}: baselines")
        rows.extend(baselines(name, v1, v2, new, work, args.timeout))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        if r.verified is False or not r.diff.ok:
            log(f"{name}: {r.tool}: {r.diff.status if not r.diff.ok else 'NOT VERIFIED'}: {r.note}")
    return info, rows
