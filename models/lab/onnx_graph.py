"""Small edits of an ONNX model held in memory: initializers, node inputs, added nodes, and the
cleanup after them (dead nodes, unused initializers, topological order)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Graph:
    """An ONNX model open for editing (`load`), written back with `save`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self._added: list[Any] = []
        self._sums: dict[str, str] = {}

    @classmethod
    def load(cls, path: Path) -> Graph:
        import onnx

        return cls(onnx.load(str(path)))

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name])

    def put(self, name: str, value: np.ndarray) -> str:
        """Set (or add) the initializer `name`; returns the name."""
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.inits[name] = self.graph.initializer[-1]
        return name

    def nodes(self, op_type: str) -> list[Any]:
        return [n for n in self.graph.node if n.op_type == op_type]

    @staticmethod
    def set_input(node: Any, index: int, name: str) -> None:
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    @staticmethod
    def set_attribute(node: Any, name: str, value: int) -> None:
        from onnx import helper

        for attribute in node.attribute:
            if attribute.name == name:
                attribute.i = value
                return
        node.attribute.append(helper.make_attribute(name, value))

    def add_reshape(self, source: str, shape: list[int]) -> str:
        """A new node reading `source` reshaped to `shape`; returns its output's name."""
        from onnx import helper

        output = f"{source}/reshaped"
        shape_name = self.put(f"{output}/shape", np.array(shape, np.int64))
        self._added.append(helper.make_node("Reshape", [source, shape_name], [output], name=output))
        return output

    def add_block_correction(self, node: Any, correction: np.ndarray, block: int) -> None:
        """Add `sum(input in each block of `block`) · correction` to `node`'s output
        (`correction` `[blocks, N]`); block sums of one input are computed once."""
        from onnx import helper

        source = node.input[0]
        blocks = correction.shape[0]
        key = f"{source}|{block}"
        if key not in self._sums:
            shape = self.put(
                f"{source}/block_shape_{block}", np.array([0, 0, blocks, block], np.int64)
            )
            axes = self.put("block_sum_axes", np.array([-1], np.int64))
            split, total = f"{source}/blocks_{block}", f"{source}/block_sums_{block}"
            self._added.append(helper.make_node("Reshape", [source, shape], [split], name=split))
            self._added.append(
                helper.make_node("ReduceSum", [split, axes], [total], name=total, keepdims=0)
            )
            self._sums[key] = total
        output = node.output[0]
        weights = self.put(f"{node.name}/correction", correction)
        main, added = f"{output}/main", f"{output}/correction"
        node.output[0] = main
        self._added.append(
            helper.make_node("MatMul", [self._sums[key], weights], [added], name=added)
        )
        self._added.append(helper.make_node("Add", [main, added], [output], name=output))

    def _prune(self) -> None:
        """Drop nodes nobody reads (repeatedly), then initializers nobody reads."""
        wanted = {o.name for o in self.graph.output}
        while True:
            used = {i for n in self.graph.node for i in n.input} | wanted
            dead = [n for n in self.graph.node if not any(o in used for o in n.output)]
            if not dead:
                break
            for node in dead:
                self.graph.node.remove(node)
        used = {i for n in self.graph.node for i in n.input}
        keep = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)

    def _sort(self) -> None:
        """Nodes in an order where each input is made before it is read."""
        made = {i.name for i in self.graph.initializer} | {i.name for i in self.graph.input}
        made.add("")
        pending, ordered = list(self.graph.node), []
        while pending:
            ready = [n for n in pending if all(i in made for i in n.input)]
            if not ready:
                raise ValueError("the edited graph has a cycle or a missing input")
            for node in ready:
                ordered.append(node)
                made.update(node.output)
            pending = [n for n in pending if n not in ready]
        del self.graph.node[:]
        self.graph.node.extend(ordered)

    def save(self, path: Path) -> None:
        """Write `path` (weights in `<name>.data` beside it), after the cleanup."""
        import onnx

        self.graph.node.extend(self._added)
        self._added = []
        self._prune()
        self._sort()
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save(self.model, str(path), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=data.name)  # fmt: skip
