"""Resources as documents: ``netctl apply -f``, ``delete -f`` and ``get`` over every kind (``kinds``: the table of
kinds; ``writer``: load, plan and commit in one transaction)."""
