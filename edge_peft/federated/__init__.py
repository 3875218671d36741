"""Federated personalisation on Flower: edge-peft devices as Flower clients, averaged as the store averages.

- ``settings.py``: what a federation runs with (artifact, rounds, local steps, update encoding, DP), from Flower's
  run and node configs;
- ``device_round.py``: one device's round with the torch-free trainer (no flwr import);
- ``average.py``: replies -> the store's aggregation (``store/aggregate.py``), decoding int8 updates and nested-rank
  prefixes (no flwr import);
- ``strategy.py``, ``apps.py``, ``simulation.py``: the Flower strategy, ``ClientApp`` and ``ServerApp``, and a run on
  Flower's simulation engine (``pip install 'edge-peft[federated]'``).
See docs/federated.md.
"""
