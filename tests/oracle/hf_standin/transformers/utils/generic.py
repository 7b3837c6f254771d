"""TEST STAND-IN for transformers.utils.generic - NOT transformers' code.

GeneralInterface: a mapping with a class-wide table (`_global_mapping`, changed for every
user by the classmethod `register`) and a per-instance table (`_local_mapping`, changed by
item assignment) that is consulted first."""
from collections.abc import MutableMapping


class GeneralInterface(MutableMapping):
    _global_mapping = {}

    def __init__(self):
        self._local_mapping = {}

    def __getitem__(self, key):
        if key in self._local_mapping:
            return self._local_mapping[key]
        return self._global_mapping[key]

    def __setitem__(self, key, value):
        self._local_mapping[key] = value

    def __delitem__(self, key):
        del self._local_mapping[key]

    def __iter__(self):
        keys = dict(self._global_mapping)
        keys.update(self._local_mapping)
        return iter(keys)

    def __len__(self):
        return len(set(self._global_mapping) | set(self._local_mapping))

    @classmethod
    def register(cls, key, value):
        cls._global_mapping[key] = value

    def valid_keys(self):
        return list(self)
