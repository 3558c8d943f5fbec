"""Working around iptables-nft-restore's cache requests (iptables 1.8.x, nft flavour).

With ``--noflush``, iptables-nft-restore 1.8.9 (Debian bookworm's, and the
kube-proxy image's) notes every chain a command names (the chain itself and
its jump target) in a list kept sorted by name, inserting with a linear
scan, and later fetches those chains from the kernel one netlink request
each. A full sync names every KUBE-SVC/SEP/EXT chain, so the cost grows as
commands x chains: measured here 0.34 s for the nat input of 1,000 services
and 2.9-4.5 s for 3,000, against 0.16 s / 0.49 s for the same input without
``--noflush`` (docs/iptables.md has the table).

A command that names a table but no chain switches that bookkeeping off for
the whole table: iptables then fetches all chains in one dump and skips the
list. Of such commands only the listing ones leave the kernel alone
(``-F``/``-X`` would flush or delete other people's chains, ``-Z`` resets
every nat counter and re-writes each counted rule), so a large nft restore
starts its nat section with ``-S``: it lists the table to iptables-restore's
stdout, which we discard. The price is reading the existing nat table,
linear in its size, which is why it is used only where the quadratic term
is larger (:func:`wants_full_chain_cache`).

``-S`` has one known failure in 1.8.9: it puts placeholder built-in chains
in the cache, so a rule for a built-in chain that does not exist yet in
the kernel fails with ENOENT. Built-in nat chains exist once our jump rules
are in them; when a jump is missing, the applier adds the missing jumps in a
small restore first (:func:`jump_prelude`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from agent.backends.iptables.restore import Mode
from agent.backends.iptables.rules import NAT, Jump

# The line that makes iptables-nft fetch the whole chain list of the table.
FULL_CACHE_LINE = "-S"

# Break-even measured here (docs/iptables.md): a second full sync of ~1,000
# services (11k nat lines, 3k chains, over 3k existing chains) costs the same
# with and without the hint; above, the hint wins more every step. The hint
# pays when commands x chains exceeds this many times the existing chains.
COST_RATIO = 10_000


def wants_full_chain_cache(mode: Mode, commands: int, chains: int, existing_chains: int) -> bool:
    """Whether a nat restore of this size should start with :data:`FULL_CACHE_LINE`."""
    if mode != "nft":
        return False  # iptables-legacy-restore has no such list: linear already
    return commands * chains > COST_RATIO * (existing_chains + 1)


def nat_section_size(text: str) -> tuple[int, int]:
    """(command lines, chain declarations) of the ``*nat`` section of a restore input."""
    commands = chains = 0
    inside = False
    for line in text.splitlines():
        if line == f"*{NAT}":
            inside = True
        elif inside and line == "COMMIT":
            break
        elif inside:
            commands += 1
            chains += line.startswith(":")
    return commands, chains


def with_full_chain_cache(text: str) -> str:
    """``text`` with :data:`FULL_CACHE_LINE` as the first command of its nat section."""
    head = f"*{NAT}\n"
    if text.startswith(head):
        return head + FULL_CACHE_LINE + "\n" + text[len(head) :]
    return text.replace(f"\n{head}", f"\n{head}{FULL_CACHE_LINE}\n", 1)


def jump_prelude(missing: Sequence[Jump], existing_chains: Collection[str]) -> str:
    """A restore adding the missing nat jumps (and creating their built-in chains).

    Their target chains are created empty where they do not exist (``-N``
    never flushes): a jump into an empty chain returns at once, so until the
    main restore fills them nothing changes for packets.
    """
    jumps = [j for j in missing if j.table == NAT]
    if not jumps:
        return ""
    out = [f"*{NAT}"]
    for target in dict.fromkeys(j.target for j in jumps):
        if target not in existing_chains:
            out.append(f"-N {target}")
    out += [f"-I {j.source} 1 {j.spec}" for j in jumps]
    out.append("COMMIT")
    return "\n".join(out) + "\n"
