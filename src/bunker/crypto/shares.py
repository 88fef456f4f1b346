"""SLIP-39 shares of the master seed, for custodians (docs/security.md section 2, SLIP-39 shares)."""

from __future__ import annotations

import shamir_mnemonic

from bunker.errors import BunkerError, ExitCode


def split_seed(seed: bytes, threshold: int, count: int, passphrase: str = "") -> list[str]:
    """Split the 32-byte master seed into ``count`` SLIP-39 mnemonics, any ``threshold`` of
    which recover it."""
    if not 1 <= threshold <= count <= 16:
        raise BunkerError(
            f"cannot make {threshold}-of-{count} shares",
            "choose 1 <= THRESHOLD <= COUNT <= 16, e.g. --shares 3-of-5",
            exit_code=ExitCode.USAGE,
        )
    groups = shamir_mnemonic.generate_mnemonics(
        1, [(threshold, count)], seed, passphrase.encode(), extendable=True, iteration_exponent=1
    )
    return list(groups[0])


def combine_shares(mnemonics: list[str], passphrase: str = "") -> bytes:
    """Recover the master seed from enough SLIP-39 mnemonics."""
    try:
        return bytes(shamir_mnemonic.combine_mnemonics(mnemonics, passphrase.encode()))
    except (shamir_mnemonic.MnemonicError, ValueError) as exc:
        raise BunkerError(
            f"the shares do not recover the master key: {exc}",
            "check each word of each share, and that you gave enough shares",
            exit_code=ExitCode.BAD_PASSPHRASE,
        ) from None
