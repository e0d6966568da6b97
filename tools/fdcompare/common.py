"""What every part of the comparison shares: paths and sizes, logging, `CompareError`,
commands measured under /usr/bin/time -v (`Measured`, `measure`, the SIGTERM handler that
kills the measured child), `Row` (one tool on one pair), and reading OCI image layouts."""

import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# tools/fdcompare/common.py -> the repository
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIME_BIN = "/usr/bin/time"
MIB = 1024 * 1024
CHUNK = 4 * MIB


class CompareError(Exception):
    """A pair cannot be compared; the message says why."""


def log(msg):
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measuring commands

class Measured:
    """Outcome of one or more measured commands (summed times, peak RSS)."""

    def __init__(self):
        self.seconds = 0.0
        self.rss_kib = 0
        self.status = "ok"      # ok | timeout | failed | skipped
        self.error = ""

    @property
    def ok(self):
        return self.status == "ok"


RUNNING = []  # the measured child, killed with its process group if we are terminated


def on_sigterm(*_):
    for proc in RUNNING:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(143)


def measure(cmds, timeout, into=None, stdin=None, stdout=None):
    """Run commands in order under /usr/bin/time -v; stop at the first failure.

    `stdin`/`stdout`: paths every command reads from / writes to (default: none / discarded).
    """
    m = into or Measured()
    for cmd in cmds:
        if not m.ok:
            break
        remaining = timeout - m.seconds
        with tempfile.NamedTemporaryFile("r", suffix=".time") as tf, \
                open(stdin or os.devnull, "rb") as fin, open(stdout or os.devnull, "wb") as fout:
            start = time.monotonic()
            proc = subprocess.Popen([TIME_BIN, "-v", "-o", tf.name] + cmd,
                                    stdin=fin, stdout=fout, stderr=subprocess.PIPE,
                                    start_new_session=True)
            RUNNING[:] = [proc]
            try:
                _, err = proc.communicate(timeout=max(remaining, 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                m.seconds += time.monotonic() - start
                m.status = "timeout"
                m.error = f"timeout after {timeout}s: {' '.join(cmd)}"
                break
            m.seconds += time.monotonic() - start
            report = tf.read()
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
        if rss:
            m.rss_kib = max(m.rss_kib, int(rss.group(1)))
        if proc.returncode != 0:
            m.status = "failed"
            m.error = f"exit {proc.returncode}: {' '.join(cmd)}: " + \
                err.decode(errors="replace").strip()[-500:]
    return m


class Row:
    """One tool on one pair."""

    def __init__(self, pair, tool, kind):
        self.pair, self.tool, self.kind = pair, tool, kind   # kind: fleetdelta|peer|baseline
        self.payload = None
        self.diff = Measured()
        self.apply = None        # Measured, or None when there is no apply step
        self.verified = None     # True/False, None when not applicable
        self.note = ""

    @property
    def usable(self):
        return self.payload is not None and self.diff.ok and self.verified is not False


# ---------------------------------------------------------------- OCI layouts

def read_json(path):
    with open(path) as f:
        return json.load(f)


def blob_path(layout, digest):
    algo, _, hexd = digest.partition(":")
    return os.path.join(layout, "blobs", algo, hexd)


def read_image(layout, tag="latest"):
    """Return (manifest, config) of the image tagged `tag` (or the only one) in a layout."""
    try:
        index = read_json(os.path.join(layout, "index.json"))
    except (OSError, ValueError) as e:
        raise CompareError(f"{layout}: not an OCI layout: {e}")
    descs = index.get("manifests", [])
    tagged = [d for d in descs
              if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    desc = (tagged or descs or [None])[0]
    if desc is None:
        raise CompareError(f"{layout}: index.json lists no manifest")
    manifest = read_json(blob_path(layout, desc["digest"]))
    if "manifests" in manifest:  # a nested index: take its first image
        manifest = read_json(blob_path(layout, manifest["manifests"][0]["digest"]))
    config = read_json(blob_path(layout, manifest["config"]["digest"]))
    return manifest, config


def open_layer(layout, desc):
    path = blob_path(layout, desc["digest"])
    media = desc.get("mediaType", "")
    if media.endswith("+zstd"):
        return subprocess.Popen(["zstd", "-dc", "-q", path], stdout=subprocess.PIPE).stdout
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def concat_layers(layout, out_path):
    """Write the image's uncompressed layer tars, in manifest order, into one file."""
    manifest, _ = read_image(layout)
    with open(out_path, "wb") as out:
        for desc in manifest["layers"]:
            with open_layer(layout, desc) as f:
                shutil.copyfileobj(f, out, CHUNK)
    return os.path.getsize(out_path)


def layer_diff_ids(layout):
    """sha256 of each layer's uncompressed bytes, computed here."""
    manifest, _ = read_image(layout)
    ids = []
    for desc in manifest["layers"]:
        h = hashlib.sha256()
        with open_layer(layout, desc) as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
        ids.append("sha256:" + h.hexdigest())
    return ids


def verify_image(out_layout, target_layout):
    """(ok, note): OUT's diff_ids, declared and recomputed, equal the target's."""
    try:
        t_manifest, t_config = read_image(target_layout)
        o_manifest, o_config = read_image(out_layout)
    except (CompareError, OSError, ValueError, KeyError) as e:
        return False, f"cannot read output image: {e}"
    want = t_config["rootfs"]["diff_ids"]
    declared = o_config.get("rootfs", {}).get("diff_ids")
    if declared != want:
        return False, "config diff_ids differ from target"
    try:
        got = layer_diff_ids(out_layout)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        return False, f"cannot decompress output layer: {e}"
    if got != want:
        bad = sum(1 for a, b in zip(got, want) if a != b) + abs(len(got) - len(want))
        return False, f"{bad} layer(s) decompress to other content than the target's diff_ids"
    same_manifest = read_image_digest(out_layout) == read_image_digest(target_layout)
    return True, "manifest identical" if same_manifest else "layers identical, manifest differs"


def read_image_digest(layout):
    index = read_json(os.path.join(layout, "index.json"))
    return index["manifests"][0]["digest"] if index.get("manifests") else None


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)
