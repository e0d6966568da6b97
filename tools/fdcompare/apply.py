"""The --apply benchmark: how fast `fleetdelta apply` rebuilds v2, against the peers' footing.

Per pair, one delta (`diff --level default`), then medians of N whole-process runs of
fleetdelta apply (exact, and --layers uncompressed from v1 as shipped and from `v1u`, a copy
of v1 with every layer decompressed), each output verified; and on the same data `rdiff
patch` of the concatenated uncompressed tars, `pigz -p P -6` of the target layers an apply
must rebuild and compress, and `cp` of NEW. Writes OUT/apply.md and OUT/apply.csv."""

import gzip
import json
import os
import shutil
import statistics
import subprocess
import tempfile

from .common import (CHUNK, CompareError, Measured, blob_path, concat_layers, dir_bytes, log,
                     measure, open_layer, read_image, read_json, verify_image)
from .encoders import put_json_blob, sha256_file
from .report import fmt_bytes, machine_line, ratio, write_dict_csv

# The tools --apply needs beyond the comparison's: binary -> Debian package.
APPLY_TOOLS = {"pigz": "pigz"}
UNCOMPRESSED_MEDIA = {"oci": "application/vnd.oci.image.layer.v1.tar",
                      "docker": "application/vnd.docker.image.rootfs.diff.tar"}
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
# Issue 21's targets: uncompressed from uncompressed <= 3x rdiff patch; exact <= 0.5x
# pigz -p N at N=1 and N=cores.
RDIFF_TARGET, PIGZ_TARGET = 3.0, 0.5


def jobs_list(text):
    """--jobs "1,2" -> [1, 2]; the default is 1 and the machine's cores."""
    if not text:
        return sorted({1, os.cpu_count() or 1})
    try:
        jobs = [int(j) for j in text.split(",") if j.strip()]
    except ValueError:
        raise CompareError(f"--jobs: not a comma-separated list of integers: {text!r}")
    if not jobs or min(jobs) < 1:
        raise CompareError(f"--jobs: each entry must be at least 1: {text!r}")
    return list(dict.fromkeys(jobs))


# ---------------------------------------------------------------- the uncompressed copy of v1

def uncompressed_media(media):
    """The plain-tar layer media type of the same family (docker or OCI) as `media`."""
    return UNCOMPRESSED_MEDIA["docker" if media.startswith("application/vnd.docker.") else "oci"]


def decompress_blob(path, out):
    """Write the blob at `path` decompressed (gzip, zstd, or already plain) to `out`."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(GZIP_MAGIC):
        with gzip.open(path, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    elif magic == ZSTD_MAGIC:
        with open(out, "wb") as dst:
            done = subprocess.run(["zstd", "-d", "-q", "-c", path], stdout=dst,
                                  stderr=subprocess.PIPE)
        if done.returncode != 0:
            raise CompareError(f"zstd -d {path}: {done.stderr.decode(errors='replace')[-300:]}")
    else:
        shutil.copyfile(path, out)


def image_descriptor(layout):
    """index.json and the entry of it that `read_image` takes (tagged latest, else the first)."""
    index = read_json(os.path.join(layout, "index.json"))
    descs = index.get("manifests", [])
    tagged = [d for d in descs
              if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == "latest"]
    return index, (tagged or descs)[0]


def write_uncompressed_layout(src, dst):
    """Copy OCI layout `src` to `dst` with every layer blob decompressed.

    Each layer descriptor gets the plain tar's digest, size and the plain-tar media type
    (OCI's or docker's); each tar is checked against its diff_id. The config blob is copied
    unchanged (a delta checks its source's config digest); a new manifest blob, index.json
    (the one image, its annotations kept) and oci-layout are written."""
    manifest, config = read_image(src)
    os.makedirs(os.path.join(dst, "blobs", "sha256"))
    shutil.copy(blob_path(src, manifest["config"]["digest"]),
                blob_path(dst, manifest["config"]["digest"]))
    diff_ids = config["rootfs"]["diff_ids"]
    if len(diff_ids) != len(manifest["layers"]):
        raise CompareError(f"{src}: {len(manifest['layers'])} layers but "
                           f"{len(diff_ids)} diff_ids")
    done = {}  # compressed digest -> (plain digest, size)
    for desc, diff_id in zip(manifest["layers"], diff_ids):
        if desc["digest"] not in done:
            tmp = os.path.join(dst, "blobs", "layer.tmp")
            decompress_blob(blob_path(src, desc["digest"]), tmp)
            digest = sha256_file(tmp)
            if digest != diff_id:
                raise CompareError(f"{src}: layer {desc['digest']} decompresses to {digest}, "
                                   f"not its diff_id {diff_id}")
            done[desc["digest"]] = (digest, os.path.getsize(tmp))
            os.replace(tmp, blob_path(dst, digest))
        desc["digest"], desc["size"] = done[desc["digest"]]
        desc["mediaType"] = uncompressed_media(desc.get("mediaType", ""))
    mdigest, msize = put_json_blob(dst, manifest)
    index, desc = image_descriptor(src)
    desc = dict(desc, digest=mdigest, size=msize)
    if manifest.get("mediaType"):  # `src` may name a nested index: name the manifest now
        desc["mediaType"] = manifest["mediaType"]
    index["manifests"] = [desc]
    with open(os.path.join(dst, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(dst, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


def write_new_layers(v1, v2, out_path):
    """Concatenate the uncompressed tars of v2's layers whose blob is not among v1's.

    Returns (bytes written, layers written, v2's layer count): what an apply must rebuild
    and compress."""
    src, _ = read_image(v1)
    dst, _ = read_image(v2)
    have = {d["digest"] for d in src["layers"]}
    fresh = [d for d in dst["layers"] if d["digest"] not in have]
    with open(out_path, "wb") as out:
        for desc in fresh:
            with open_layer(v2, desc) as f:
                shutil.copyfileobj(f, out, CHUNK)
    return os.path.getsize(out_path), len(fresh), len(dst["layers"])


# ---------------------------------------------------------------- timing

class ApplyRow:
    """One row of a pair's table: a command, its runs, their median and largest peak RSS."""

    def __init__(self, pair, name, kind, jobs=None):
        self.pair, self.name, self.jobs = pair, name, jobs
        self.kind = kind          # fleetdelta | peer | baseline
        self.runs = []            # seconds of each timed run
        self.median = Measured()  # median wall seconds, largest peak RSS, or the failure
        self.verified = None      # True/False, None when the output is not checked
        self.note = ""


def remove(path):
    """Remove a file or a directory tree, if there."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def bench(row, cmd, out, timeout, repeat, check=None, check_last=True):
    """Run `cmd` once untimed (warms the page cache), then `repeat` times under `measure`.

    `out` (a file or directory, may be None) is removed before the first run and after each;
    `check()` -> (ok, note) judges the warm run's output and (`check_last`) the last timed
    run's, so nothing of ours runs between timed runs but the removal. A failed check on the
    warm run stops the row."""
    if out:
        remove(out)
    warm = measure([cmd], timeout)
    if warm.ok and check:
        row.verified, row.note = check()
        if not row.verified:
            warm.status, warm.error = "failed", f"warm run: {row.note}"
    if out:
        remove(out)
    if not warm.ok:
        row.median, row.note = warm, warm.error
        return row
    rss = 0
    for i in range(repeat):
        m = measure([cmd], timeout)
        if not m.ok:
            row.median, row.note = m, m.error
            break
        row.runs.append(m.seconds)
        rss = max(rss, m.rss_kib)
        if i == repeat - 1 and check and check_last:
            row.verified, note = check()
            if not row.verified:
                row.note = f"last timed run: {note}"
        if out:
            remove(out)
    if len(row.runs) == repeat:
        row.median.seconds, row.median.rss_kib = statistics.median(row.runs), rss
    return row


def fleetdelta_rows(pair, exe, v1, v1u, v2, delta, work, jobs, args):
    """exact, uncompressed from gzip (v1) and uncompressed from uncompressed (v1u) per J."""
    out = os.path.join(work, "out")
    check = lambda: verify_image(out, v2)
    rows = []
    for name, source, layers in (("exact", v1, []),
                                 ("uncompressed from gzip", v1, ["--layers", "uncompressed"]),
                                 ("uncompressed from uncompressed", v1u,
                                  ["--layers", "uncompressed"])):
        for j in jobs:
            log(f"{pair}: fleetdelta apply, {name}, jobs={j}")
            row = ApplyRow(pair, f"{name} jobs={j}", "fleetdelta", j)
            cmd = [exe, "apply", "--quiet", "--jobs", str(j)] + layers + \
                  [f"oci:{source}", f"oci:{delta}", f"oci:{out}"]
            rows.append(bench(row, cmd, out, args.timeout, args.apply_repeat, check))
    return rows


def same_file(path, want):
    """(ok, note): `path` equals `want` byte for byte (cmp)."""
    ok = subprocess.run(["cmp", "-s", want, path]).returncode == 0
    return ok, "" if ok else "output differs from NEW"


def peer_rows(pair, old, new, target, target_note, work, jobs, args):
    """rdiff patch of OLD to NEW, pigz -p P of TARGET, cp of NEW."""
    sig, d, out = (os.path.join(work, f) for f in ("rdiff.sig", "rdiff.delta", "rdiff.out"))
    log(f"{pair}: rdiff signature + delta (untimed), then rdiff patch")
    row = ApplyRow(pair, "rdiff patch", "peer")
    prep = measure([["rdiff", "-f", "-b", "512", "-S", "32", "signature", old, sig],
                    ["rdiff", "-f", "delta", sig, new, d]], args.timeout)
    if not prep.ok:
        row.median, row.note = prep, prep.error
        rows = [row]
    else:
        rows = [bench(row, ["rdiff", "-f", "patch", old, d, out], out, args.timeout,
                      args.apply_repeat, lambda: same_file(out, new), check_last=False)]
        if row.verified:
            row.note = f"rdiff delta {fmt_bytes(os.path.getsize(d))}"
    for f in (sig, d):
        remove(f)
    for p in jobs:
        row = ApplyRow(pair, f"pigz -p {p}", "peer", p)
        if target is None:
            row.median.status, row.note = "skipped", target_note
        else:
            log(f"{pair}: pigz -p {p} -6")
            bench(row, ["pigz", "-p", str(p), "-6", "-c", target], None, args.timeout,
                  args.apply_repeat)
            row.note = row.note or target_note
        rows.append(row)
    log(f"{pair}: cp NEW")
    copy = os.path.join(work, "copy")
    rows.append(bench(ApplyRow(pair, "cp NEW", "baseline"), ["cp", new, copy], copy,
                      args.timeout, args.apply_repeat))
    return rows


def apply_pair(name, args, jobs):
    """(info, rows) for one pair; its scratch directory is removed whatever happens."""
    v1, v2 = (os.path.abspath(os.path.join(args.pairs_dir, name, v)) for v in ("v1", "v2"))
    for v in (v1, v2):
        if not os.path.exists(os.path.join(v, "index.json")):
            raise CompareError(f"{v} is not an OCI layout (build it: tools/build-corpus {name})")
    work = tempfile.mkdtemp(prefix=f"compare-apply-{name}-", dir=args.work_dir)
    try:
        exe = args.fleetdelta_exe
        delta, v1u = os.path.join(work, "delta"), os.path.join(work, "v1u")
        log(f"{name}: fleetdelta diff --level default (untimed)")
        made = measure([[exe, "diff", "--quiet", "--level", "default", f"oci:{v1}",
                         f"oci:{v2}", f"oci:{delta}"]], args.timeout)
        if not made.ok:
            raise CompareError(f"{name}: {made.error}")
        log(f"{name}: v1 with every layer decompressed (v1u)")
        write_uncompressed_layout(v1, v1u)
        old, new, target = (os.path.join(work, f) for f in ("OLD", "NEW", "TARGET"))
        info = {"pair": name, "v1_compressed": dir_bytes(os.path.join(v1, "blobs")),
                "v2_compressed": dir_bytes(os.path.join(v2, "blobs")),
                "delta_bytes": dir_bytes(os.path.join(delta, "blobs")),
                "old_bytes": concat_layers(v1, old), "new_bytes": concat_layers(v2, new)}
        info["target_bytes"], fresh, total = write_new_layers(v1, v2, target)
        info["target_layers"] = f"{fresh} of {total}"
        target_note = f"TARGET {fmt_bytes(info['target_bytes'])}: {fresh} of {total} layers"
        if not fresh:
            target, target_note = None, "skipped: every target layer blob is in v1"
        rows = fleetdelta_rows(name, exe, v1, v1u, v2, delta, work, jobs, args)
        rows += peer_rows(name, old, new, target, target_note, work, jobs, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info, rows


# ---------------------------------------------------------------- reports

def target_of(row, cores):
    """(Issue 21's bound, the ratio's reference row) for a row that has a target."""
    if row.name.startswith("uncompressed from uncompressed"):
        return RDIFF_TARGET, "rdiff patch"
    if row.name.startswith("exact") and row.jobs in (1, cores):
        return PIGZ_TARGET, f"pigz -p {row.jobs}"
    return None, None


def apply_cells(info, rows):
    """The report's values for a pair's rows, shared by the markdown and the CSV."""
    seconds = {r.name: r.median.seconds for r in rows if r.median.ok and r.runs}
    cores = os.cpu_count() or 1
    cells = []
    for r in rows:
        s = seconds.get(r.name)
        vs_rdiff = ratio(s, seconds.get("rdiff patch")) if r.name.startswith("uncompressed") \
            else None
        vs_pigz = ratio(s, seconds.get(f"pigz -p {r.jobs}")) if r.name.startswith("exact") \
            else None
        bound, _ = target_of(r, cores)
        value = vs_rdiff if r.name.startswith("uncompressed") else vs_pigz
        cells.append({
            "pair": info["pair"], "row": r.name, "kind": r.kind,
            "jobs": "" if r.jobs is None else r.jobs, "runs": len(r.runs),
            "median_s": s, "min_s": min(r.runs) if s is not None else None,
            "max_s": max(r.runs) if s is not None else None,
            "runs_s": " ".join(f"{t:.3f}" for t in r.runs),
            "mb_s": info["new_bytes"] / 1e6 / s if s else None,
            "peak_rss_kib": r.median.rss_kib if s is not None else None,
            "new_bytes": info["new_bytes"], "old_bytes": info["old_bytes"],
            "target_bytes": info["target_bytes"], "delta_bytes": info["delta_bytes"],
            "vs_rdiff_patch": vs_rdiff, "vs_pigz_same_jobs": vs_pigz,
            "issue21_target": "" if bound is None else f"<= {bound:g}",
            "issue21_met": None if bound is None or value is None else value <= bound,
            "status": r.median.status, "verified": r.verified, "note": r.note,
        })
    return cells


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def met_word(c):
    if not c["issue21_target"]:
        return "-"
    return c["issue21_target"] + ": " + {True: "met", False: "**missed**", None: "n/a"}[
        c["issue21_met"]]


def pair_table(info, rows):
    """Markdown lines: the pair's sizes, then one line per row."""
    lines = [f"## {info['pair']}", "",
             f"v1 {fmt_bytes(info['v1_compressed'])} / v2 {fmt_bytes(info['v2_compressed'])} "
             f"compressed; delta {fmt_bytes(info['delta_bytes'])}; OLD "
             f"{fmt_bytes(info['old_bytes'])} / NEW {fmt_bytes(info['new_bytes'])} uncompressed; "
             f"TARGET {fmt_bytes(info['target_bytes'])} ({info['target_layers']} target layers "
             f"not in v1).", "",
             "| row | median s | MB/s of NEW | peak MiB | / rdiff patch (uncompressed rows) | "
             "/ pigz -p J (exact jobs=J) | Issue 21 | verified | note |",
             "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for c in apply_cells(info, rows):
        s = fmt(c["median_s"], 3) if c["median_s"] is not None else c["status"]
        rss = "-" if c["peak_rss_kib"] is None else f"{c['peak_rss_kib'] / 1024:.1f}"
        ver = {True: "yes", False: "**NO**", None: "-"}[c["verified"]]
        note = c["note"].replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {c['row']} | {s} | {fmt(c['mb_s'], 1)} | {rss} | "
                     f"{fmt(c['vs_rdiff_patch'])} | {fmt(c['vs_pigz_same_jobs'])} | "
                     f"{met_word(c)} | {ver} | {note} |")
    return lines + [""]


def write_apply_markdown(path, results, args, load):
    repeat = args.apply_repeat
    lines = ["# Apply speed: fleetdelta apply against rdiff patch, pigz and cp", "",
             f"Run: {machine_line()}; load average {load[0]:.2f} before, "
             f"{os.getloadavg()[0]:.2f} after.", "",
             "Per pair, one delta (`fleetdelta diff --level default`, made once, not timed). Each "
             "row is a whole process, run once untimed to warm the page cache, then "
             f"{repeat} time{'' if repeat == 1 else 's'}: `median s` is the median wall time, "
             "`peak MiB` the largest peak RSS (/usr/bin/time -v), `MB/s of NEW` the target's "
             "uncompressed bytes over the median (for every row, pigz's included).", "",
             "- `exact jobs=J`: `fleetdelta apply --jobs J oci:v1 oci:DELTA oci:OUT`, the "
             "target's blobs rebuilt byte for byte (compressed as v2's were).",
             "- `uncompressed from gzip jobs=J`: the same with `--layers uncompressed` (plain "
             "tar layers out), from v1 as shipped (gzip layers).",
             "- `uncompressed from uncompressed jobs=J`: `--layers uncompressed` from `v1u`, "
             "v1 with every layer blob decompressed (same config, so the same config digest).",
             "- `rdiff patch`: `rdiff patch OLD DELTA OUT`, OLD/NEW the concatenated "
             "uncompressed layer tars of v1/v2, the rdiff delta (`-b 512 -S 32`) made once.",
             "- `pigz -p P`: `pigz -p P -6 -c TARGET > /dev/null`, TARGET the uncompressed tars "
             "of the target layers whose blob is not in v1 (what an apply must rebuild and "
             "compress).",
             "- `cp NEW`: a copy of NEW, the raw copy baseline.", "",
             "Every fleetdelta output is verified (config diff_ids, and each layer decompressed "
             "and hashed) after the warm run and after the last timed run; rdiff's warm output "
             "is compared with NEW byte for byte.", "",
             "Ratios (median over median): every `uncompressed` row / `rdiff patch`; every "
             "`exact jobs=J` row / `pigz -p J`. Issue 21's targets: uncompressed from "
             f"uncompressed <= {RDIFF_TARGET:g}x rdiff patch; exact <= {PIGZ_TARGET:g}x pigz -p N "
             f"at N=1 and N=cores ({os.cpu_count()} here).", ""]
    for info, rows in results:
        lines += pair_table(info, rows)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def csv_value(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.4f}" if isinstance(v, float) else v


def write_apply_csv(path, results):
    write_dict_csv(path, [c for info, rows in results for c in apply_cells(info, rows)], csv_value)


def run_apply(names, args):
    """The --apply benchmark over the pairs `names`: returns the exit status."""
    if args.apply_repeat < 1:
        raise CompareError("--apply-repeat must be at least 1")
    jobs = jobs_list(args.jobs)
    load = os.getloadavg()
    md, csv_path = (os.path.join(args.out_dir, f) for f in ("apply.md", "apply.csv"))
    results = []
    for name in names:
        results.append(apply_pair(name, args, jobs))
        write_apply_markdown(md, results, args, load)
        write_apply_csv(csv_path, results)
    log(f"wrote {md}, {csv_path}")
    for info, rows in results:
        print("\n".join(pair_table(info, rows)))
    bad = [(r.pair, r.name) for _, rows in results for r in rows
           if r.verified is False or r.median.status not in ("ok", "skipped")]
    if bad:
        log("FAILED (not verified, failed or timed out): "
            + ", ".join(f"{p}/{n}" for p, n in bad))
        return 2
    return 0
