"""Verify the ledger: every chain and the global chain, or one run's chain.

It seals what has been committed but not sealed yet first (``audit.ledger.seal_all``), so the
global chain it checks covers every committed event, and the head it prints anchors them all.

Exit status: 0 when the chains hold, 1 when one does not (the first broken event is printed),
2 for bad usage (an id that is not a UUID, a chain the ledger does not have)."""

from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit import ledger, verify
from audit.models import ChainHead, Event


class Command(BaseCommand):
    help = ("Recompute the ledger's hash chains: every run's chain, the configuration chain and "
            "the global chain, or one run's chain with --run. Exits 1 and names the first "
            "broken event if an event was edited, deleted, inserted or reordered.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--run", metavar="ID",
                            help="verify only this run's chain (a run id, or another chain's id)")

    def handle(self, *args: Any, **options: Any) -> None:
        ledger.seal_all()
        if options["run"]:
            result = verify.verify_chain(self._chain(options["run"]))
            self._fail_if_broken([result])
            self.stdout.write(f"OK: {result.describe()}")
            return
        chains = events = broken = 0
        first: verify.Verification | None = None
        for result in verify.verify_chains():
            chains += 1
            events += result.events
            if not result.ok:
                broken += 1
                first = first or result
        overall = verify.verify_global()
        if broken > 1:
            self.stderr.write(f"{broken} chains are broken; the first:")
        self._fail_if_broken([r for r in (first, overall) if r is not None])
        gseq, ghash = verify.global_head()
        # Events committed after seal_all() above are checked in their chains but not yet sealed.
        pending = f" ({overall.unsealed} newer event(s) not sealed yet)" if overall.unsealed else ""
        self.stdout.write(f"OK: {chains} chain(s), {events} event(s); global chain intact{pending}")
        self.stdout.write(f"global head: gseq {gseq} ghash {ghash}")

    def _fail_if_broken(self, results: list[verify.Verification]) -> None:
        broken = [r for r in results if not r.ok]
        for result in broken:
            self.stderr.write(f"BROKEN {result.describe()}")
        if broken:
            raise CommandError("the ledger does not verify", returncode=1)

    def _chain(self, value: str) -> uuid.UUID:
        try:
            chain = uuid.UUID(value)
        except ValueError:
            raise CommandError(f"--run must be a run id (a UUID), not {value!r}",
                               returncode=2) from None
        if chain == ledger.GLOBAL_CHAIN:
            raise CommandError("the global chain is verified by running without --run",
                               returncode=2)
        if not (ChainHead.objects.filter(chain=chain).exists()
                or Event.objects.filter(chain=chain).exists()):
            raise CommandError(f"the ledger has no chain {chain}", returncode=2)
        return chain
