#!/usr/bin/env python3
"""Write the list of image objects under a GCS prefix, one full object name per line.

    python generate_blob_list.py --bucket-name BUCKET --bucket-path imagenet/train \
        --output-file train-blob-list.txt [--extensions .jpg,.jpeg,.png] [--upload NAME]

Listing ImageNet's 1.28M objects takes minutes; a trial given the list as data.train_blob_list
(after --upload, or a manual `gcloud storage cp`) reads it in one request instead. The names are
the ones the trial uses: images in <prefix>/<class>/ directories, by class then name.

Credentials: Application Default Credentials (or the emulator at STORAGE_EMULATOR_HOST).
Exit status: 0 done, 1 the bucket could not be listed or holds no images there, 2 bad arguments.
"""

import argparse
import sys
import time
from collections import Counter
from typing import List, Optional, Sequence

import gcs
import sources
from config import ConfigError
from utils import atomic_write, exit_status, format_table


class Failure(Exception):
    """A mistake or failure to report as one line on stderr."""


def parse_extensions(text: str) -> tuple:
    extensions = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item or item == ".":
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of extensions like .jpg,.png"
            )
        extensions.append(item if item.startswith(".") else "." + item)
    return tuple(extensions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket-name", required=True, help="bucket, without gs://")
    parser.add_argument(
        "--bucket-path",
        required=True,
        help="prefix holding <class>/<image> objects, e.g. imagenet/train",
    )
    parser.add_argument(
        "--output-file", required=True, help="where to write the list (replaced atomically)"
    )
    parser.add_argument(
        "--extensions",
        type=parse_extensions,
        default=sources.IMAGE_EXTENSIONS,
        help=f"comma-separated extensions to keep, case-insensitive (default {','.join(sources.IMAGE_EXTENSIONS)})",
    )
    parser.add_argument(
        "--upload", metavar="OBJECT_NAME", help="also upload the list to this object of the bucket"
    )
    parser.add_argument(
        "--progress-every",
        type=int,
        default=10000,
        metavar="N",
        help="report progress every N objects listed (stderr)",
    )
    return parser


def listing_error(error: gcs.GCSError, url: str, bucket: str) -> Failure:
    if error.status == 404:
        return Failure(f"bucket gs://{bucket} does not exist (404)")
    if error.status in (401, 403):
        return Failure(
            f"no permission to list {url} ({error.status}): the credentials in use need "
            f"storage.objects.list on gs://{bucket}"
        )
    return Failure(str(error))


def write_atomically(path: str, lines: Sequence[str]) -> None:
    """A reader never sees half a list."""
    with atomic_write(path, temp_prefix=".blob-list-") as f:
        f.writelines(line + "\n" for line in lines)


def run(args: argparse.Namespace) -> None:
    try:
        bucket, prefix = gcs.parse_gcs_url(f"gs://{args.bucket_name}/{args.bucket_path}")
    except ConfigError as e:
        raise Failure(str(e)) from None
    url = f"gs://{bucket}/{prefix}"
    unreadable = [e for e in args.extensions if e not in sources.IMAGE_EXTENSIONS]
    if unreadable:
        print(
            f"note: the trial reads only {', '.join(sources.IMAGE_EXTENSIONS)}; it will skip {', '.join(unreadable)} objects",
            file=sys.stderr,
        )

    started = time.monotonic()
    next_report = [args.progress_every]

    def progress(count: int) -> None:
        if args.progress_every > 0 and count >= next_report[0]:
            print(
                f"listed {count:,} objects under {url} ({time.monotonic() - started:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
            next_report[0] = (count // args.progress_every + 1) * args.progress_every

    try:
        client = gcs.gcs_client()
        object_names = gcs.list_gcs_objects(client, bucket, prefix, on_page=progress)
    except gcs.GCSError as e:
        raise listing_error(e, url, bucket) from None
    print(
        f"listed {len(object_names):,} objects in {time.monotonic() - started:.1f}s",
        file=sys.stderr,
    )
    if not object_names:
        raise Failure(f"no objects under {url}: check --bucket-name and --bucket-path")
    bad = [n for n in object_names if "\n" in n or "\r" in n]
    if bad:  # a name with a line break cannot be written one per line
        raise Failure(f"object name {bad[0]!r} holds a line break; it cannot go into a blob list")

    names, labels, classes = sources.class_folder_names(object_names, prefix, args.extensions)
    if not names:
        raise Failure(
            f"{len(object_names):,} objects under {url} but no images in class directories "
            f"(expected {url}<class>/<image> with extensions {','.join(args.extensions)})"
        )
    try:
        write_atomically(args.output_file, [prefix + n for n in names])
    except OSError as e:
        raise Failure(
            f"cannot write --output-file {args.output_file!r}: {e.strerror or e}"
        ) from None

    counts = Counter(labels)
    print(
        format_table([[cls, str(counts[i])] for i, cls in enumerate(classes)], ["class", "images"])
    )
    outside = sum(1 for n in object_names if n.lower().endswith(args.extensions)) - len(names)
    if outside:
        print(
            f"left out {outside:,} images that are not in a class directory (directly under the prefix or hidden)"
        )
    print(f"{len(names):,} images in {len(classes)} classes under {url} -> {args.output_file}")

    if args.upload:
        target = f"gs://{bucket}/{args.upload}"
        blob = client.bucket(bucket).blob(args.upload)
        try:  # re-uploading the same list is harmless, so a retried upload is safe
            gcs.call_with_retries(
                target,
                lambda: blob.upload_from_filename(
                    args.output_file,
                    content_type="text/plain",
                    retry=None,
                    timeout=gcs.GCS_TIMEOUT_S,
                ),
            )
        except gcs.GCSError as e:
            raise Failure(str(e)) from None
        print(
            f"uploaded to {target} (set data.train_blob_list or data.test_blob_list to {args.upload!r})"
        )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # exits with 2 on bad arguments
    return exit_status(lambda: run(args), (Failure,))


if __name__ == "__main__":
    sys.exit(main())
