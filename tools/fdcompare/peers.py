"""The peer delta tools fleetdelta is compared with (xdelta3, zstd --patch-from at -19 and -3,
bsdiff, rdiff): their commands, one measured and verified run each, and `ensure_tools`, which
installs the Debian packages the comparison needs (the peers, /usr/bin/time and, for the
plot, python3-matplotlib; pigz for --apply)."""

import importlib
import os
import shutil
import subprocess
import sys

from .common import TIME_BIN, CompareError, Row, log, measure

PEERS = ("xdelta3", "zstd-19", "zstd-3", "bsdiff", "rdiff")
# binary -> Debian package
TOOLS = {"xdelta3": "xdelta3", "zstd": "zstd", "bsdiff": "bsdiff", "bspatch": "bsdiff",
         "rdiff": "rdiff", "cmp": "diffutils"}
# The plot's library, and the interpreter Debian installs it for.
PLOT_PACKAGE = "python3-matplotlib"
DEBIAN_PYTHON = "/usr/bin/python3"
REEXEC_ENV = "FLEETDELTA_COMPARE_REEXEC"  # set when re-run under DEBIAN_PYTHON, against loops


def peer_commands(tool, old, new, work):
    """(diff commands, patch file to size, apply commands, output file)."""
    p = os.path.join(work, tool)
    if tool == "xdelta3":
        return ([["xdelta3", "-9", "-e", "-f", "-s", old, new, p + ".vcdiff"]], p + ".vcdiff",
                [["xdelta3", "-d", "-f", "-s", old, p + ".vcdiff", p + ".out"]], p + ".out")
    if tool in ("zstd-19", "zstd-3"):
        lvl = "-" + tool.split("-")[1]
        return ([["zstd", lvl, "-q", "-f", f"--patch-from={old}", "--long=31", new, "-o", p + ".zst"]],
                p + ".zst",
                [["zstd", "-d", "-q", "-f", f"--patch-from={old}", "--long=31", p + ".zst",
                  "-o", p + ".out"]], p + ".out")
    if tool == "bsdiff":
        return ([["bsdiff", old, new, p + ".patch"]], p + ".patch",
                [["bspatch", old, p + ".out", p + ".patch"]], p + ".out")
    if tool == "rdiff":
        return ([["rdiff", "-f", "-b", "512", "-S", "32", "signature", old, p + ".sig"],
                 ["rdiff", "-f", "delta", p + ".sig", new, p + ".delta"],
                 ["zstd", "-19", "-q", "-f", p + ".delta", "-o", p + ".delta.zst"]],
                p + ".delta.zst",
                [["zstd", "-d", "-q", "-f", p + ".delta.zst", "-o", p + ".delta2"],
                 ["rdiff", "-f", "patch", old, p + ".delta2", p + ".out"]], p + ".out")
    raise ValueError(tool)


def run_peer(pair, tool, old, new, work, timeout):
    row = Row(pair, tool, "peer")
    diff_cmds, patch, apply_cmds, out = peer_commands(tool, old, new, work)
    measure(diff_cmds, timeout, row.diff)
    if not row.diff.ok:
        row.note = row.diff.error
    else:
        row.payload = os.path.getsize(patch)
        row.apply = measure(apply_cmds, timeout)
        if not row.apply.ok:
            row.verified, row.note = False, row.apply.error
        else:
            row.verified = subprocess.run(["cmp", "-s", new, out]).returncode == 0
            if not row.verified:
                row.note = "output differs from NEW"
    for f in os.listdir(work):
        if f.startswith(tool + "."):
            os.remove(os.path.join(work, f))
    return row


def have_matplotlib():
    importlib.invalidate_caches()
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def deb_installed(package):
    query = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package],
                           capture_output=True, text=True)
    return query.stdout == "install ok installed"


def apt_install(packages, why="missing tools"):
    """Install Debian packages as root; otherwise say which to install."""
    if os.geteuid() != 0:
        raise CompareError(f"{why}; install Debian packages: {' '.join(packages)}")
    log(f"installing missing Debian packages: {' '.join(packages)}")
    subprocess.run(["apt-get", "update"], check=True, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends"] + packages,
                   check=True, capture_output=True)


def ensure_tools(plot=True, extra=None):
    """Install what is missing: the peers, `extra` ({binary: Debian package}, e.g. --apply's
    pigz), /usr/bin/time and (`plot`) python3-matplotlib.

    Debian's python3-matplotlib is importable by Debian's python3 only: when this script runs
    under another interpreter (a venv, pyenv) that cannot import it, it is run again under
    /usr/bin/python3 with the same arguments."""
    tools = dict(TOOLS, **(extra or {}))
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if not os.path.exists(TIME_BIN):
        missing.append("time")
    need_plot = plot and not have_matplotlib()
    if need_plot and not deb_installed(PLOT_PACKAGE):
        missing.append(PLOT_PACKAGE)
    if missing:
        apt_install(missing)
    if not need_plot or have_matplotlib():
        return
    here = os.path.realpath(sys.executable) if sys.executable else ""
    if (os.path.exists(DEBIAN_PYTHON) and here != os.path.realpath(DEBIAN_PYTHON)
            and not os.environ.get(REEXEC_ENV)):
        log(f"{sys.executable} cannot import matplotlib; running again under {DEBIAN_PYTHON}")
        sys.stderr.flush()
        os.execve(DEBIAN_PYTHON, [DEBIAN_PYTHON, os.path.abspath(sys.argv[0])] + sys.argv[1:],
                  dict(os.environ, **{REEXEC_ENV: "1"}))
    raise CompareError(f"{sys.executable} cannot import matplotlib (Debian's {PLOT_PACKAGE} "
                       f"is for {DEBIAN_PYTHON}: run tools/compare with it)")
