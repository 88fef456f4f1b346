"""The plaintext documents every repository carries: RECOVERY.md and FORMAT.md (no secrets)."""

from __future__ import annotations

from importlib import resources

from bunker import __version__
from bunker.build_info import source_commit


def _source_step() -> str:
    """Where Bunker comes from: its source, identified by the commit that wrote this file. No
    package of Bunker is published in a package index; a package found there under a name like
    it may be anybody's code, and a disaster is when a stranger would install it unchecked."""
    commit = source_commit()
    if commit:
        check = f"""This repository was last written by Bunker {__version__}, source commit

    {commit}

Install Bunker from its source, from the copy you kept with the key (a git clone, a `git bundle`
or an archive of one), and check that it is that commit (a `+local-changes` suffix above means
the writer ran a changed copy of it):

    git -C bunker log -1 --format=%H       # bunker/ being the source: must print the commit above"""
    else:
        check = f"""This repository was last written by Bunker {__version__}, from a source whose commit was not
recorded. Install Bunker from the copy of its source you kept with the key, and check it
against the commit id you wrote down with the key:

    git -C bunker log -1 --format=%H       # bunker/ being the source"""
    return (
        check
        + """

Bunker is not published in any package index: do not install a package found there under a name
like it, which may be anybody's code. Then install (Python 3.11 or newer; as root on Debian it
also installs python3-venv; the README says where the command ends up):

    sh bunker/scripts/install
    bunker --version                       # names the same commit"""
    )


def recovery_md(repo_id: str) -> str:
    """Step-by-step recovery instructions for a stranger holding the master key or its shares."""
    return f"""# Recovering this Bunker repository

Repository id (fingerprint of the master verify key):

    {repo_id}

Whoever holds this directory can rewrite this file, so the id above proves nothing by itself.
The trusted copy is the one you kept: the first comment line of the master key file or of a put
key file, or what `bunker init` or `bunker key info` printed and you stored offline with the key
or its shares. Compare the two, and give your own copy to `--expect` in step 2.

This directory (or bucket) is an encrypted, deduplicating backup made by Bunker. Nothing in it is
secret except through the **master key**; with the master key (or enough of its SLIP-39 shares)
a stranger with a fresh machine can restore everything.

## 1. Get Bunker, and check that it is the right source

{_source_step()}

## 2. Check the copy is complete and authentic (no key needed)

    bunker check --keyless --repo PATH_OR_URL --expect THE_ID_YOU_KEPT

A repository that is not a local directory (s3://, gcs://, azblob://, b2://, webdav, sftp://,
ssh://) needs the storage's credentials in the environment of every command: for S3
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; for the others see "Environment variables" in
docs/user-guide.md of the source. They are neither in this repository nor in the master key.

Every object's bytes must match its name, every signature must chain to the master verify key
whose fingerprint is the id you gave, and each client's snapshot chain must have no gap. If it
says the repository is not the one your key is for, this is not your repository, or it was
replaced.

## 3. Get the master key

- You have the master key file and its passphrase: pass it with `--master-key FILE`.
- You have SLIP-39 shares: `bunker key recover --out master.key` asks for the shares and a new
  passphrase and writes the master key file.

## 4. Restore

    bunker snapshots --repo PATH_OR_URL --master-key master.key
    bunker restore latest --repo PATH_OR_URL --master-key master.key --target /restore/here

`--client NAME`, `--host H`, `--path P` and `--tag T` choose among snapshots; `restore` takes
paths inside the snapshot to restore only part of it. Set BUNKER_PASSPHRASE to run unattended.

## 5. If Bunker cannot be installed

FORMAT.md, next to this file, describes every object so a new reader can be written from it.
"""


def format_md() -> str:
    """The on-disk format description (the same text as docs/format.md)."""
    return resources.files("bunker.repo").joinpath("FORMAT.md").read_text(encoding="utf-8")
