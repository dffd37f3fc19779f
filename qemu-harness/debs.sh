# Sourced by the image builders (build-guest.sh, build-xen.sh,
# hostside-build.sh): Debian packages fetched by exact version into
# $CACHE/debs, never installed.

cand() { # package -> its candidate version
    apt-cache policy "$1" | awk '/Candidate:/ && !n++ {print $2}'
}

fetch() { # package version -> path of the .deb
    local pkg=$1 ver=$2 f
    f=$(ls "$CACHE/debs/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | sed -n 1p || true)
    if [ -z "$f" ]; then
        (cd "$CACHE/debs" && apt-get download -q "$pkg=$ver" >&2 2>/dev/null) ||
            (cd "$CACHE/debs" && apt-get download "$pkg=$ver" >&2)
        f=$(ls "$CACHE/debs/${pkg}_${ver//:/%3a}_"*.deb | sed -n 1p)
    fi
    echo "$f"
}
