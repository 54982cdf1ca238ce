#!/usr/bin/env bash
# Download the paper's released data (checkpoints, test images, dataload CSV, embeddings; about 6 GB) into SSL_data/.
# Usage: bash download_data.sh [TARGET_DIR]     (default: SSL_data)
set -euo pipefail

URL="https://www.dropbox.com/sh/ezdq6413dooy24w/AACPXxVydjciEnTqMNuHQyeka?dl=1"
TARGET="${1:-SSL_data}"
ARCHIVE="${TARGET}.zip.part"

if [ -d "$TARGET" ] && [ -n "$(ls -A "$TARGET" 2>/dev/null)" ]; then
    echo "error: $TARGET already exists and is not empty; remove it or pass another folder" >&2
    exit 2
fi
if command -v wget >/dev/null 2>&1; then
    wget --continue --output-document "$ARCHIVE" "$URL"
elif command -v curl >/dev/null 2>&1; then
    curl --location --fail --continue-at - --output "$ARCHIVE" "$URL"
else
    echo "error: neither wget nor curl is installed" >&2
    exit 2
fi
if ! command -v unzip >/dev/null 2>&1; then
    echo "error: unzip is not installed; the archive is at $ARCHIVE" >&2
    exit 2
fi
TMPDIR_UNPACK="$(mktemp -d "${TARGET}.unpack.XXXXXX")"
trap 'rm -rf "$TMPDIR_UNPACK"' EXIT
unzip -q "$ARCHIVE" -d "$TMPDIR_UNPACK" -x "/"
mkdir -p "$TARGET"
mv "$TMPDIR_UNPACK"/* "$TARGET"/
rm -f "$ARCHIVE"
for sub in checkpoints test_images dataload embeddings; do
    [ -e "$TARGET/$sub" ] || echo "warning: $TARGET/$sub is missing from the archive" >&2
done
echo "downloaded the paper's data into $TARGET"
