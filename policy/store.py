"""Policies in etcd: ``/netplugin/v1/policies/<name>``, each the validated resource as JSON.

A file is stored all-or-nothing: every policy it holds goes into one transaction, after every document has been
validated, so a bad file changes nothing.
"""

from netplugin.datastore import keys
from netplugin.datastore.client import put_op
from netplugin.errors import InvalidInput, NotFound
from policy.model import Policy
from policy.validation import PolicyValidationError

MAX_PER_TXN = 100


def apply_policies(ds, policies):
    """Create or replace ``policies`` (validated Policy objects); returns their names."""
    if len(policies) > MAX_PER_TXN:
        raise InvalidInput(f"at most {MAX_PER_TXN} policies per apply (got {len(policies)}); split the file")
    ops = [put_op(keys.policy(p.name), p.to_dict()) for p in policies]
    if ops:
        ds.txn([], ops)
    return [p.name for p in policies]


def list_policies(ds):
    return [decode_policy(kv) for kv in ds.list(keys.POLICIES)]


def get_policy(ds, name):
    kv = ds.get(keys.policy(name))
    if kv is None:
        raise NotFound(f"policy {name} does not exist")
    return decode_policy(kv)


def delete_policy(ds, name):
    if not ds.delete(keys.policy(name)):
        raise NotFound(f"policy {name} does not exist")


def decode_policy(kv):
    """A stored record -> Policy. netctl validates before storing, so a bad record was written some other way:
    say which one, so the operator can ``netctl policy delete`` it."""
    try:
        return Policy.from_dict(kv.value)
    except PolicyValidationError as err:
        name = keys.last_segment(kv.key)
        raise PolicyValidationError([f"stored policy {name} is invalid: {p}" for p in err.problems]) from None
