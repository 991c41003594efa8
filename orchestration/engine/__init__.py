"""The orchestration engine: plain Python, no Django.

It builds a run's task DAG from a plan, decides which tasks may start (never more than the
hydration limit at once), executes them through registered contracts and checkpoints every step
through a :class:`~orchestration.engine.store.RunStore` that the Django side implements.
"""
