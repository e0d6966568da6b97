"""fleetdelta against peer delta tools: the package behind `tools/compare`.

common   constants, logging, measured commands (/usr/bin/time -v), SIGTERM, OCI layout reading
peers    the peer tools (xdelta3, zstd, bsdiff, rdiff) and the Debian packages the run needs
runner   one comparison: fleetdelta at each level, the peers and the baselines on one pair
report   ratios against the issue's targets, results.md, results.csv and the matplotlib plot
encoders the --encoders benchmark (exact re-encoding per gzip encoder)
apply    the --apply benchmark (apply speed against rdiff patch, pigz and cp)
"""
