"""The traced functions of a SavedModel numbered by the build, not by the process that made it.

TensorFlow names each function it traces ``<name>_<N>``, N from one counter per process: the same servable packaged
in a fresh process and in one that traced other functions first (a ``--stage all`` run, or a second run in one
Python session) got other names, other ``saved_model.pb`` bytes, another hash, and was published again as a new
version. :func:`canonical_function_names` renumbers them 0, 1, 2, … in the order they were traced (the counter's
order, which one build's code fixes), everywhere the SavedModel names them, and the captured inputs the counter named
too.
"""

from __future__ import annotations

import re

NUMBERED = re.compile(r"^(.+_)(\d+)$")


def canonical_function_names(proto) -> dict[str, str]:
    """Rename, in place, every numbered function of ``proto`` (a ``SavedModel`` message) and every string field that
    names one (call ops' ``f``, the object graph's concrete functions, gradients); returns old name → new name."""
    names = {function.signature.name for meta in proto.meta_graphs for function in meta.graph_def.library.function}
    numbered = sorted((int(match.group(2)), name, match.group(1)) for name in names
                      if (match := NUMBERED.match(name)))
    renamed = {name: f"{stem}{index}" for index, (_, name, stem) in enumerate(numbered)}
    _rename(proto, renamed)
    _renumber_captures(proto)
    for meta in proto.meta_graphs:  # TensorFlow lists them by name: by the new names now
        functions = sorted(meta.graph_def.library.function, key=lambda function: function.signature.name)
        kept = [type(function)() for function in functions]
        for copy, function in zip(kept, functions, strict=True):
            copy.CopyFrom(function)
        del meta.graph_def.library.function[:]
        meta.graph_def.library.function.extend(kept)
    return renamed


def _renumber_captures(proto) -> None:
    """A captured tensor's argument is named by the same counter when its capture had no name of its own (its
    ``_user_specified_name``, which nothing refers to): renumbered 0, 1, 2, … in the counter's order too."""
    attrs = [attr["_user_specified_name"] for meta in proto.meta_graphs for function in meta.graph_def.library.function
             for arg in function.arg_attr.values() for attr in (arg.attr,) if "_user_specified_name" in attr]
    numbered = sorted({int(value.s) for value in attrs if value.s.isdigit()})
    index = {number: str(position).encode() for position, number in enumerate(numbered)}
    for value in attrs:
        if value.s.isdigit():
            value.s = index[int(value.s)]


def _rename(message, renamed: dict[str, str]) -> None:
    from google.protobuf.descriptor import FieldDescriptor

    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            if not field.is_repeated:
                if value in renamed:
                    setattr(message, field.name, renamed[value])
            else:
                for index, item in enumerate(value):
                    if item in renamed:
                        value[index] = renamed[item]
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                _rename_map(field, value, renamed)
            elif field.is_repeated:
                for item in value:
                    _rename(item, renamed)
            else:
                _rename(value, renamed)


def _rename_map(field, entries, renamed: dict[str, str]) -> None:
    from google.protobuf.descriptor import FieldDescriptor

    key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
    messages = value.type == FieldDescriptor.TYPE_MESSAGE
    if key.type == FieldDescriptor.TYPE_STRING and any(name in renamed for name in entries):
        # all at once: a new name may be another entry's old one
        held = {}
        for name in entries:
            if messages:
                held[renamed.get(name, name)] = copy = type(entries[name])()
                copy.CopyFrom(entries[name])
            else:
                held[renamed.get(name, name)] = entries[name]
        entries.clear()
        for name, item in held.items():
            if messages:
                entries[name].CopyFrom(item)
            else:
                entries[name] = item
    for name in list(entries):
        if messages:
            _rename(entries[name], renamed)
        elif value.type == FieldDescriptor.TYPE_STRING and entries[name] in renamed:
            entries[name] = renamed[entries[name]]
