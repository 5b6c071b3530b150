"""Where models live: the manifest format (`manifests`), fsspec storage for local paths, gs:// and
s3:// (`storage`), publish / fetch / cache of versions (`registry`), checkpoints in the bucket
(`checkpoints`), and `sqltune models` (`cli`)."""
