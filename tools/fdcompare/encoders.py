"""The --encoders benchmark: per pair and gzip encoder, v1 and v2 re-compressed by the
encoder's real tool, fleetdelta diff --fidelity exact and content and the apply of each,
verified, and the real tool's encode throughput against fleetdelta's port
(examples/exact_encode). Writes OUT/encoders.md and OUT/encoders.csv."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib

from .common import (CHUNK, REPO, CompareError, Measured, blob_path, log, measure, open_layer,
                     read_image, read_image_digest, read_json, verify_image)
from .report import fmt_bytes, machine_line, ratio, write_dict_csv


# The encoders whose output fleetdelta's applier reproduces (crates/engine/src/layer/exact), each with the
# real tool that writes it. `all` is the set the benchmark reports.
ENCODER_SETS = {"all": ("pgzip", "kpgzip", "stdgzip", "zlib6", "zlib9", "gnu9")}
ENCODER_RE = re.compile(r"^(pgzip|pgzip1m|kpgzip|stdgzip|zlib[1-9]|gnu[1-9])$")
GO_PACKAGES = ("golang-go", "golang-github-klauspost-compress-dev",
               "golang-github-klauspost-pgzip-dev")
GO_ZERO_TIME_MTIME = 0x886E0900  # the MTIME Go's zero time.Time gives pgzip/klauspost headers
# zlib 1.2.13 (the system's, through Python's zlib module): a raw gzip member, wbits=31.
ZLIB_PY = ("import sys, zlib\n"
           "c = zlib.compressobj(int(sys.argv[1]), zlib.DEFLATED, 31)\n"
           "r, w = sys.stdin.buffer, sys.stdout.buffer\n"
           "for b in iter(lambda: r.read(1 << 20), b''):\n"
           "    w.write(c.compress(b))\n"
           "w.write(c.flush())\n")


def encoder_names(text):
    names = []
    for part in text.split(","):
        part = part.strip()
        for name in ENCODER_SETS.get(part, (part,)):
            if not ENCODER_RE.match(name):
                raise CompareError(f"--encoders: unknown encoder {name!r} (pgzip, pgzip1m, kpgzip, "
                                   f"stdgzip, zlib1..zlib9, gnu1..gnu9, or all)")
            if name not in names:
                names.append(name)
    return names


def level_xfl(level):
    """XFL that zlib and GNU gzip write: 2 at level 9, 4 at level 1, else 0."""
    return 2 if level == 9 else 4 if level == 1 else 0


def encoder_spec(name, exact_gen):
    """(what writes it, real command reading stdin, port encoder JSON, expected header)."""
    if name.startswith("pgzip"):
        block = 1 << 20 if name == "pgzip1m" else 256 << 10
        return (f"klauspost/pgzip 1.2.5, {block >> 10} KiB blocks"
                + (" (umoci)" if block == 256 << 10 else " (its default)"),
                [exact_gen, "pgzip", str(block)], {"kind": "pgzip", "block_size": block},
                (GO_ZERO_TIME_MTIME, 0, 255))
    if name == "kpgzip":
        return ("klauspost/compress 1.15.12 gzip", [exact_gen, "kpgzip"],
                {"kind": "klauspost-gzip"}, (GO_ZERO_TIME_MTIME, 0, 255))
    if name == "stdgzip":
        return ("Go 1.19 compress/gzip (docker, buildkit)", [exact_gen, "stdgzip"],
                {"kind": "go-gzip", "release": "go1.19"}, (0, 0, 255))
    level = int(name[-1])
    if name.startswith("zlib"):
        return (f"zlib {zlib.ZLIB_RUNTIME_VERSION} level {level} (python3 zlib, wbits=31)",
                [sys.executable, "-c", ZLIB_PY, str(level)], {"kind": "zlib", "level": level},
                (0, level_xfl(level), 3))
    return (f"GNU gzip -n -{level}", ["gzip", "-n", f"-{level}", "-c"],
            {"kind": "gnu-gzip", "level": level}, (0, level_xfl(level), 3))


def gzip_header(path):
    """(mtime, xfl, os) of a gzip member with no optional header fields."""
    with open(path, "rb") as f:
        head = f.read(10)
    if len(head) < 10 or head[:3] != b"\x1f\x8b\x08" or head[3] != 0:
        raise CompareError(f"{path}: not a plain gzip member header: {head.hex()}")
    return int.from_bytes(head[4:8], "little"), head[8], head[9]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def put_json_blob(layout, value):
    raw = json.dumps(value, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    with open(blob_path(layout, digest), "wb") as f:
        f.write(raw)
    return digest, len(raw)


class Encoded:
    """One pair re-compressed by one encoder's real tool."""

    def __init__(self, name, label):
        self.name, self.label = name, label
        self.tars = []          # (diff_id, tar path, tar bytes, real blob path) per unique tar
        self.real = Measured()  # summed over the unique tars
        self.port = Measured()
        self.port_identical = None
        self.header = None      # (mtime, xfl, os) of the first blob the tool wrote
        self.header_note = ""


def recompress_image(src, dst, enc, cmd, cache, work, timeout):
    """Copy layout `src` to `dst`, its gzip layers re-compressed by `cmd` (stdin -> stdout).

    `cache` maps diff_id -> (digest, size, blob path), so a tar shared by v1 and v2 is
    compressed once. The config (and so the diff_ids) is unchanged; the manifest gets the new
    layer digests and sizes, index.json the new manifest digest."""
    manifest, config = read_image(src)
    os.makedirs(os.path.join(dst, "blobs", "sha256"))
    shutil.copy(os.path.join(src, "oci-layout"), dst)
    shutil.copy(blob_path(src, manifest["config"]["digest"]),
                blob_path(dst, manifest["config"]["digest"]))
    diff_ids = config["rootfs"]["diff_ids"]
    for desc, diff_id in zip(manifest["layers"], diff_ids):
        media = desc.get("mediaType", "")
        if not media.endswith("gzip"):
            shutil.copy(blob_path(src, desc["digest"]), blob_path(dst, desc["digest"]))
            continue
        if diff_id not in cache:
            tar = os.path.join(work, diff_id.split(":")[1] + ".tar")
            h = hashlib.sha256()
            with open_layer(src, desc) as f, open(tar, "wb") as out:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
            if "sha256:" + h.hexdigest() != diff_id:
                raise CompareError(f"{src}: layer {desc['digest']} does not match its diff_id")
            blob = tar + ".gz"
            step = measure([cmd], timeout, stdin=tar, stdout=blob)
            enc.real.seconds += step.seconds
            enc.real.rss_kib = max(enc.real.rss_kib, step.rss_kib)
            if not step.ok:
                raise CompareError(f"{enc.name}: {step.error}")
            if enc.header is None:
                enc.header = gzip_header(blob)
            digest = sha256_file(blob)
            cache[diff_id] = (digest, os.path.getsize(blob), blob)
            enc.tars.append((diff_id, tar, os.path.getsize(tar), blob))
        digest, size, blob = cache[diff_id]
        shutil.copy(blob, blob_path(dst, digest))
        desc["digest"], desc["size"] = digest, size
    mdigest, msize = put_json_blob(dst, manifest)
    index = read_json(os.path.join(src, "index.json"))
    desc = dict(index["manifests"][0], digest=mdigest, size=msize)
    index["manifests"] = [desc]
    with open(os.path.join(dst, "index.json"), "w") as f:
        json.dump(index, f)


def measure_port(enc, exact_encode, descriptor, work, timeout):
    """Time the port on the same tars as the real tool; check it writes the same bytes."""
    enc.port_identical = True
    for _, tar, _, blob in enc.tars:
        out = tar + ".port.gz"
        step = measure([[exact_encode, json.dumps(descriptor)]], timeout, stdin=tar, stdout=out)
        enc.port.seconds += step.seconds
        enc.port.rss_kib = max(enc.port.rss_kib, step.rss_kib)
        if not step.ok:
            enc.port.status, enc.port_identical = step.status, None
            enc.port.error = ("encoder not in this build" if "not known to this build" in step.error
                              else step.error)
            return
        if sha256_file(out) != sha256_file(blob):
            enc.port_identical = False
        os.remove(out)


def delta_layers(exe, delta):
    """(payload bytes, per-layer "method/encoding" words) from `fleetdelta info --json`."""
    info = subprocess.run([exe, "info", f"oci:{delta}", "--json"], capture_output=True, text=True)
    if info.returncode != 0:
        raise CompareError(f"fleetdelta info {delta}: {info.stderr.strip()[-300:]}")
    data = json.loads(info.stdout)
    words = []
    for layer in data["layers"]:
        encoding = layer.get("encoding") or {"kind": "legacy"}
        kind = encoding["kind"]
        if kind == "exact":
            e = encoding["descriptor"]["encoder"]
            params = "".join(f" {k}={v}" for k, v in e.items() if k != "kind")
            kind = f"exact {e['kind']}{params}"
        words.append(f"{layer['method']}/{kind}")
    return data["payload_bytes"], words


def summarize_layers(words):
    """'2 source/verbatim, 1 patch/exact zlib level=9' (counts in first-seen order)."""
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    return ", ".join(f"{n} {w}" for w, n in counts.items())


class EncoderRow:
    """One pair re-compressed by one encoder: exact vs content deltas, and apply speeds."""

    def __init__(self, pair, enc):
        self.pair, self.enc = pair, enc
        self.diff = {}       # fidelity -> Measured
        self.payload = {}    # fidelity -> bytes
        self.layers = {}     # fidelity -> summary words
        self.apply = {}      # fidelity -> Measured
        self.verified = {}   # same keys -> bool
        self.kept = {}       # same keys -> manifest digest equals the target's
        self.notes = []


def apply_and_check(row, key, exe, v1, delta, v2, work, timeout, repeat):
    """Apply `repeat` times (median wall time, largest peak RSS); verify the first output."""
    runs = []
    for i in range(repeat):
        out = os.path.join(work, f"out-{key}")
        m = measure([[exe, "apply", "--quiet", f"oci:{v1}", f"oci:{delta}", f"oci:{out}"]],
                    timeout)
        runs.append(m)
        if not m.ok:
            row.apply[key], row.verified[key] = m, False
            row.notes.append(f"apply {key}: {m.error}")
            shutil.rmtree(out, ignore_errors=True)
            return
        if i == 0:
            row.verified[key], note = verify_image(out, v2)
            row.kept[key] = read_image_digest(out) == read_image_digest(v2)
            if not row.verified[key]:
                row.notes.append(f"apply {key}: {note}")
        shutil.rmtree(out, ignore_errors=True)
    median = Measured()
    median.seconds = sorted(m.seconds for m in runs)[len(runs) // 2]
    median.rss_kib = max(m.rss_kib for m in runs)
    row.apply[key] = median


def run_encoder(pair, name, v1, v2, args, work):
    label, cmd, encoder_json, expected = encoder_spec(name, args.exact_gen)
    enc = Encoded(name, label)
    row = EncoderRow(pair, enc)
    ework = os.path.join(work, name)
    os.makedirs(ework)
    try:
        log(f"{pair}: {name}: re-compressing v1 and v2 with {label}")
        cache = {}
        ev1, ev2 = os.path.join(ework, "v1"), os.path.join(ework, "v2")
        recompress_image(v1, ev1, enc, cmd, cache, ework, args.timeout)
        recompress_image(v2, ev2, enc, cmd, cache, ework, args.timeout)
        same = [[d["digest"] for d in read_image(a)[0]["layers"]]
                == [d["digest"] for d in read_image(b)[0]["layers"]] for a, b in ((v1, ev1), (v2, ev2))]
        if all(same):
            row.notes.append("the real tool rewrote every corpus layer blob byte for byte "
                             "(same layer digests as the originals)")
        if enc.header and enc.header != expected:
            enc.header_note = "unexpected header"
            row.notes.append(f"header (mtime, xfl, os) {enc.header}, expected {expected}")
        if enc.header:
            descriptor = {"encoder": encoder_json,
                          "header": dict(zip(("mtime", "xfl", "os"), enc.header))}
            log(f"{pair}: {name}: port on the same {len(enc.tars)} tar(s)")
            measure_port(enc, args.exact_encode, descriptor, ework, args.timeout)
        for _, tar, _, blob in enc.tars:
            os.remove(tar)
            os.remove(blob)
        exe = args.fleetdelta_exe
        for fidelity in ("exact", "content"):
            log(f"{pair}: {name}: diff + apply --fidelity {fidelity}")
            delta = os.path.join(ework, f"delta-{fidelity}")
            row.diff[fidelity] = measure(
                [[exe, "diff", "--quiet", "--fidelity", fidelity, f"oci:{ev1}", f"oci:{ev2}",
                  f"oci:{delta}"]], args.timeout)
            if not row.diff[fidelity].ok:
                row.notes.append(f"diff {fidelity}: {row.diff[fidelity].error}")
                continue
            row.payload[fidelity], row.layers[fidelity] = delta_layers(exe, delta)
            apply_and_check(row, fidelity, exe, ev1, delta, ev2, ework, args.timeout,
                            args.apply_repeat)
            shutil.rmtree(delta, ignore_errors=True)
    finally:
        shutil.rmtree(ework, ignore_errors=True)
    return row


def ensure_encoder_tools(names, work):
    """Install what the chosen encoders need; build tools/exact-gen if a Go one is chosen."""
    go = any(n.startswith(("pgzip", "kpgzip", "stdgzip")) for n in names)
    want = ["gzip"] if any(n.startswith("gnu") for n in names) else []
    if go:
        want += GO_PACKAGES
    missing = [p for p in want if subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}", p], capture_output=True, text=True).stdout
        != "install ok installed"]
    if missing:
        if os.geteuid() != 0:
            raise CompareError(f"--encoders needs Debian packages: {' '.join(missing)}")
        log(f"installing missing Debian packages: {' '.join(missing)}")
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends"] + missing,
                       check=True, capture_output=True)
    if any(n.startswith("gnu") for n in names) and shutil.which("gzip") is None:
        raise CompareError("--encoders: no gzip on PATH after installing Debian's gzip")
    if not go:
        return None
    exe = os.path.join(work, "exact-gen")
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode")
    built = subprocess.run(["go", "build", "-o", exe, "./tools/exact-gen"], cwd=REPO, env=env,
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise CompareError(f"building tools/exact-gen failed (needs {' '.join(GO_PACKAGES)}): "
                           f"{built.stderr.strip()[-500:]}")
    return exe


def mb_per_s(nbytes, m):
    return f"{nbytes / 1e6 / m.seconds:.1f}" if m.ok and m.seconds else "-"


def encoder_cells(r):
    """The report's values for one row, shared by the markdown and the CSV."""
    e = r.enc
    tar_bytes = sum(t[2] for t in e.tars)
    ap = r.apply
    ok = lambda k: k in ap and ap[k].ok
    sec = lambda k: ap[k].seconds if ok(k) else None
    pe, pc = r.payload.get("exact"), r.payload.get("content")
    return {
        "pair": r.pair, "encoder": e.name, "written_by": e.label,
        "header": "-" if not e.header else f"mtime={e.header[0]:#x} xfl={e.header[1]} os={e.header[2]}",
        "layers_exact": summarize_layers(r.layers.get("exact", [])),
        "layers_content": summarize_layers(r.layers.get("content", [])),
        "payload_exact": pe, "payload_content": pc,
        "payload_exact_vs_content": ratio(pe, pc),
        "diff_exact_s": r.diff["exact"].seconds if "exact" in r.diff and r.diff["exact"].ok else None,
        "apply_exact_s": sec("exact"), "apply_content_s": sec("content"),
        "exact_vs_content": ratio(sec("exact"), sec("content")),
        "apply_exact_rss_kib": ap["exact"].rss_kib if ok("exact") else None,
        "apply_content_rss_kib": ap["content"].rss_kib if ok("content") else None,
        "manifest_kept_exact": r.kept.get("exact"), "manifest_kept_content": r.kept.get("content"),
        "verified": all(r.verified.values()) if r.verified else None,
        "tar_bytes": tar_bytes, "tars": len(e.tars),
        "real_s": e.real.seconds if e.real.ok else None,
        "port_s": e.port.seconds if e.port.ok else None,
        "real_mb_s": mb_per_s(tar_bytes, e.real), "port_mb_s": mb_per_s(tar_bytes, e.port),
        "port_vs_real": ratio(e.port.seconds, e.real.seconds) if e.port.ok and e.real.ok else None,
        "real_rss_kib": e.real.rss_kib, "port_rss_kib": e.port.rss_kib if e.port.ok else None,
        "port_identical": e.port_identical,
        "port_status": e.port.error if not e.port.ok else "ok",
        "notes": "; ".join(r.notes),
    }


def yes_no(v):
    return {True: "yes", False: "**no**", None: "-"}[v]


def fmt_ratio(v):
    return "-" if v is None else f"{v:.3f}"


def fmt_s(v):
    return "-" if v is None else f"{v:.2f}"


APPLY_REPEAT = [3]  # set from --apply-repeat, for the report's text


def write_encoders_markdown(path, rows, load):
    cells = [encoder_cells(r) for r in rows]
    lines = ["# The cost of bit-exactness, by encoder", "",
             f"Run: {machine_line()}; load average {load[0]:.2f} before, "
             f"{os.getloadavg()[0]:.2f} after.", "",
             "Each corpus pair is rewritten with its gzip layers decompressed and re-compressed "
             "by the real tool of one encoder (same tars, so the same diff_ids; new blob, "
             "manifest and index digests). fleetdelta then diffs it at the default level with "
             "`--fidelity exact` and `--fidelity content` and applies each delta; every applied "
             "image is verified (diff_ids declared and recomputed), and `manifest kept` says "
             "whether the rebuilt manifest digest is the target's.", "",
             "Both deltas are applied as fleetdelta wrote them; neither is edited here. They "
             "differ only on layers that no known encoder reproduces, even with a correction "
             "stream: `exact` carries those whole, `content` patches them and recompresses "
             "them with the applier's own gzip (`patch/recompressed`, another digest). Every "
             "layer an encoder reproduces is re-encoded byte for byte at both fidelities, so "
             "where `layers` shows one list (no `content:` part) the two deltas do the same "
             "work and `apply exact / content` is about 1 by construction: it is not the cost "
             "of exact re-encoding against plain gzip recompression, which this benchmark "
             "does not measure. What the encoder itself costs is in the throughput table "
             "below. Apply times are the median of "
             f"{APPLY_REPEAT[0]} run{'' if APPLY_REPEAT[0] == 1 else 's'}, apply MiB the largest peak RSS. "
             "`layers` lists the delta's layers as "
             "`method/encoding` (from `fleetdelta info --json`): `patch/exact ...` is a layer "
             "rebuilt and re-encoded byte for byte, `blob/verbatim` a layer carried whole, "
             "`patch/recompressed` one patched and recompressed with another digest.", "",
             "## Payload and apply time", "",
             "| pair | encoder | layers (exact delta) | payload exact | payload content | "
             "payload exact / content | apply s exact | apply s content | "
             "apply exact / content | apply MiB exact / content | manifest kept (exact / content) "
             "| verified |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in cells:
        rss = "/".join("-" if v is None else f"{v / 1024:.0f}"
                       for v in (c["apply_exact_rss_kib"], c["apply_content_rss_kib"]))
        layers = c["layers_exact"]
        if c["layers_content"] and c["layers_content"] != layers:
            layers += f" (content: {c['layers_content']})"
        lines.append(
            f"| {c['pair']} | {c['encoder']} | {layers} | {fmt_bytes(c['payload_exact'])} | "
            f"{fmt_bytes(c['payload_content'])} | {fmt_ratio(c['payload_exact_vs_content'])} | "
            f"{fmt_s(c['apply_exact_s'])} | {fmt_s(c['apply_content_s'])} | "
            f"{fmt_ratio(c['exact_vs_content'])} | {rss} | "
            f"{yes_no(c['manifest_kept_exact'])} / {yes_no(c['manifest_kept_content'])} | "
            f"{yes_no(c['verified'])} |")
    lines += ["", "## Raw encode throughput: the real tool vs fleetdelta's port", "",
              "Both compress the same tars (every distinct layer tar of the pair's two images), "
              "each as a process reading the tar on stdin and writing the blob to a file, "
              "timed around the process; the port is `examples/exact_encode.rs` "
              "(`Descriptor::encode`, as the applier streams it; pgzip blocks in parallel on "
              "rayon's pool). `identical` compares the port's output with the real tool's, "
              "byte for byte.", "",
              "| pair | encoder | written by | header | tar MB | real s | real MB/s | port s | "
              "port MB/s | port / real time | real / port peak MiB | identical |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in cells:
        port = c["port_status"]
        port_s = fmt_s(c["port_s"]) if port == "ok" else port.replace("|", "\\|")[:80]
        rss = "/".join("-" if not v else f"{v / 1024:.0f}"
                       for v in (c["real_rss_kib"], c["port_rss_kib"]))
        lines.append(
            f"| {c['pair']} | {c['encoder']} | {c['written_by']} | {c['header']} | "
            f"{c['tar_bytes'] / 1e6:.1f} | {fmt_s(c['real_s'])} | {c['real_mb_s']} | {port_s} | "
            f"{c['port_mb_s']} | {fmt_ratio(c['port_vs_real'])} | {rss} | "
            f"{yes_no(c['port_identical'])} |")
    notes = [(c["pair"], c["encoder"], c["notes"]) for c in cells if c["notes"]]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {p} {e}: {n}" for p, e, n in notes]
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_encoders_csv(path, rows):
    write_dict_csv(path, [encoder_cells(r) for r in rows],
                   lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else v)


def run_encoders(names, pairs, args):
    """The --encoders benchmark: returns the exit status."""
    work = tempfile.mkdtemp(prefix="compare-encoders-", dir=args.work_dir)
    load = os.getloadavg()
    if args.apply_repeat < 1:
        raise CompareError("--apply-repeat must be at least 1")
    APPLY_REPEAT[0] = args.apply_repeat
    rows = []
    try:
        args.exact_gen = ensure_encoder_tools(names, work)
        for pair in pairs:
            v1, v2 = (os.path.abspath(os.path.join(args.pairs_dir, pair, v)) for v in ("v1", "v2"))
            for v in (v1, v2):
                if not os.path.exists(os.path.join(v, "index.json")):
                    raise CompareError(f"{v} is not an OCI layout (build it: tools/build-corpus {pair})")
            for name in names:
                rows.append(run_encoder(pair, name, v1, v2, args, work))
                write_encoders_markdown(os.path.join(args.out_dir, "encoders.md"), rows, load)
                write_encoders_csv(os.path.join(args.out_dir, "encoders.csv"), rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {args.out_dir}/encoders.md, encoders.csv")
    bad = [(r.pair, r.enc.name) for r in rows
           if not r.verified or not all(r.verified.values()) or r.enc.port_identical is False
           or not all(m.ok for m in r.diff.values())
           or r.enc.port.error not in ("", "encoder not in this build")]
    if bad:
        log("FAILED (not verified, or the port failed or wrote other bytes): "
            + ", ".join(f"{p}/{e}" for p, e in bad))
        return 2
    return 0
