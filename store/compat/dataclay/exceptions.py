"""dataClay 4's exception classes, by their dataClay names and messages.

The compatibility layer raises these where dataClay would, so an
application's ``except dataclay.exceptions.AliasDoesNotExistError`` keeps
working. Each also carries the claypot error it stands for as
``__cause__``. The tree:

    DataClayException
    ├── AlreadyExistError        "<id> already exists"
    ├── DoesNotExistError        "<id> does not exist"
    ├── AliasError
    │   ├── AliasDoesNotExistError   "Alias <dataset>/<alias> does not exist"
    │   └── AliasAlreadyExistError   "Alias <dataset>/<alias> already exists"
    ├── ObjectError
    │   ├── ObjectNotRegisteredError "Object <id> is not registered!"
    │   ├── ObjectIsNotVersionError  "Object <id> is not a version!"
    │   ├── ObjectIsMasterError      "Object <id> is the master!"
    │   ├── ObjectNotFound           "Object <id> not found."
    │   └── ObjectStorageError       "Could not store object <id>."
    ├── BackendError
    │   ├── BackendDoesNotExistError "Backend <id> does not exist!"
    │   └── NoOtherBackendsAvailable "There are no other backends available"
    └── DataClayFeatureUnavailable   claypot has no replicas yet (``new_replica``);
                                     also a store.errors.FeatureUnavailable
"""

from __future__ import annotations

from store.errors import FeatureUnavailable

DEFAULT_DATASET = "admin"


class DataClayException(Exception):
    """Base of the dataClay exceptions."""


class AlreadyExistError(DataClayException):
    """Something with this id already exists."""

    def __init__(self, id):
        super().__init__(id)
        self.id = id

    def __str__(self):
        return f"{self.id} already exists"


class DoesNotExistError(DataClayException):
    """Nothing with this id exists."""

    def __init__(self, id):
        super().__init__(id)
        self.id = id

    def __str__(self):
        return f"{self.id} does not exist"


class AliasError(DataClayException):
    """Base of the alias errors."""

    def __init__(self, alias_name, dataset_name=DEFAULT_DATASET):
        super().__init__(alias_name, dataset_name)
        self.alias_name = alias_name
        self.dataset_name = dataset_name


class AliasDoesNotExistError(AliasError):
    """No object has this alias."""

    def __str__(self):
        return f"Alias {self.dataset_name}/{self.alias_name} does not exist"


class AliasAlreadyExistError(AliasError):
    """Another object has this alias."""

    def __str__(self):
        return f"Alias {self.dataset_name}/{self.alias_name} already exists"


class ObjectError(DataClayException):
    """Base of the object errors."""

    def __init__(self, object_id):
        super().__init__(object_id)
        self.object_id = object_id


class ObjectNotRegisteredError(ObjectError):
    """The operation needs a persistent object."""

    def __str__(self):
        return f"Object {self.object_id} is not registered!"


class ObjectIsNotVersionError(ObjectError):
    """consolidate_version on an object that is not a version."""

    def __str__(self):
        return f"Object {self.object_id} is not a version!"


class ObjectIsMasterError(ObjectError):
    """The object is its own master copy (sync of a local master)."""

    def __str__(self):
        return f"Object {self.object_id} is the master!"


class ObjectNotFound(ObjectError):
    """No object has this id."""

    def __str__(self):
        return f"Object {self.object_id} not found."


class ObjectStorageError(ObjectError):
    """The object could not be stored."""

    def __str__(self):
        return f"Could not store object {self.object_id}."


class BackendError(DataClayException):
    """Base of the backend errors."""

    def __init__(self, ee_id):
        super().__init__(ee_id)
        self.ee_id = ee_id


class BackendDoesNotExistError(BackendError):
    """No backend has this id."""

    def __str__(self):
        return f"Backend {self.ee_id} does not exist!"


class NoOtherBackendsAvailable(BackendError):
    """A move or version needs another backend and there is none."""

    def __init__(self, ee_id=None):
        super().__init__(ee_id)

    def __str__(self):
        return "There are no other backends available"


class DataClayFeatureUnavailable(DataClayException, FeatureUnavailable):
    """A dataClay feature claypot does not have yet (replicas); also claypot's
    ``store.errors.FeatureUnavailable``."""


__all__ = [
    name for name, value in list(globals().items()) if isinstance(value, type) and issubclass(value, DataClayException)
]
