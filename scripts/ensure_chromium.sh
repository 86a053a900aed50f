#!/bin/sh
# Make sure a headless Chromium is available for the report test (tests/test_report.py).
# Installs Debian's `chromium` package (and a font for its pages) with apt-get when the binary is missing and we
# are root.
# Always exits 0: the test itself decides whether a missing browser is a skip or a failure.

find_chromium() {
    for name in chromium chromium-browser; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if path=$(find_chromium); then
    echo "chromium found: $path ($("$path" --version 2>/dev/null | head -n 1))"
    exit 0
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "chromium is missing: installing Debian's chromium package with apt-get (a few minutes)"
    start=$(date +%s)
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core >/dev/null; then
        echo "installed chromium in $(( $(date +%s) - start )) s"
    else
        echo "apt-get could not install chromium"
    fi
fi

if path=$(find_chromium); then
    echo "chromium found: $path ($("$path" --version 2>/dev/null | head -n 1))"
else
    echo "chromium is not available; the report's browser test will be skipped."
    echo "Install it with: sudo apt-get install chromium   (Debian/Ubuntu), or put chromium on PATH."
fi
exit 0
