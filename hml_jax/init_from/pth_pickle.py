"""The pickle of a .pth file checked before it is unpickled (hml_jax/init_from/pth_files.py
states the bounds): pickletools.genops parses it without executing anything, and _Scan follows
the unpickler's stack and memo opcode by opcode, refusing every opcode and name a tensor state
dict does not need. Also the errors of the .pth reader and their messages."""
import pickle
import pickletools
from typing import Any, FrozenSet, List, NamedTuple, Optional, Tuple

from hml_jax.runtime import errors


class PthFileError(errors.UserError, ValueError):
  """A .pth file that cannot be read as a state dict: damaged, not torch.save's, or hostile."""


class UnsafePickleError(PthFileError, pickle.UnpicklingError):
  """The pickle names a callable or class other than those of a tensor state dict, or uses them
  otherwise than torch.save does."""


class Bounds(NamedTuple):
  """pth_files.MAX_NESTING, MAX_OBJECTS and MAX_STACK, as the reader passes them."""
  max_nesting: int
  max_objects: int
  max_stack: int


# The callables a state dict's pickle calls.
ORDERED_DICT = ('collections', 'OrderedDict')
REBUILD_TENSOR = ('torch._utils', '_rebuild_tensor_v2')
REBUILD_PARAMETER = ('torch._utils', '_rebuild_parameter')
CALLABLES = (ORDERED_DICT, REBUILD_TENSOR, REBUILD_PARAMETER)


def damaged(path: str, reason: str) -> PthFileError:
  return PthFileError(f'{path}: {reason}. The file is damaged or was not written by torch.save: '
                      'download or save it again.')


def refused_name(path: str, module: str, name: str) -> UnsafePickleError:
  return UnsafePickleError(
      f'{path}: refused to load {module}.{name}: a weights file may only hold tensors '
      "(torch's tensor rebuilds, storages and OrderedDict); this one names other code, which "
      'was not run. Use a state dict saved by torch.save(model.state_dict(), ...) from a '
      'source you trust.')


def unsafe(path: str, reason: str) -> UnsafePickleError:
  return UnsafePickleError(
      f'{path}: {reason}, which no state dict of torch.save does; nothing in it was run. Use a '
      'state dict saved by torch.save(model.state_dict(), ...) from a source you trust.')


class _Node:
  """What the scan knows of an object the pickle makes: its nesting depth, and whether it is
  already inside another object (after which it may not change)."""
  __slots__ = ('kind', 'depth', 'inside', 'name')

  def __init__(self, kind: str, depth: int, name: Optional[Tuple[str, str]] = None):
    self.kind, self.depth, self.inside, self.name = kind, depth, False, name


_SCALAR = None  # on the scan's stack for None, a bool, a number or bytes

_SCALARS = frozenset([
    'NONE', 'NEWTRUE', 'NEWFALSE', 'BININT', 'BININT1', 'BININT2', 'LONG1', 'BINFLOAT',
    'SHORT_BINBYTES', 'BINBYTES', 'BINBYTES8'
])
_STRINGS = frozenset(['SHORT_BINUNICODE', 'BINUNICODE', 'BINUNICODE8'])
_PUTS = frozenset(['BINPUT', 'LONG_BINPUT', 'MEMOIZE'])
_GETS = frozenset(['BINGET', 'LONG_BINGET'])
_TUPLES = {'TUPLE1': 1, 'TUPLE2': 2, 'TUPLE3': 3}
# Every opcode of Python's pickler for dicts, lists, tuples, str, bytes, numbers, None, bools,
# globals, REDUCE, BUILD and persistent ids, protocols 2 to 5. Not: the text opcodes of
# protocols 0 and 1, instances (INST, OBJ, NEWOBJ), extension codes, sets, bytearrays,
# out-of-band buffers, LONG4 (an int of over 255 bytes), POP and DUP (never written for a
# state dict).
_OPCODES = (_SCALARS | _STRINGS | _PUTS | _GETS | frozenset(_TUPLES) | frozenset([
    'PROTO', 'FRAME', 'STOP', 'MARK', 'GLOBAL', 'STACK_GLOBAL', 'REDUCE', 'BUILD', 'BINPERSID',
    'EMPTY_TUPLE', 'TUPLE', 'EMPTY_LIST', 'APPEND', 'APPENDS', 'EMPTY_DICT', 'SETITEM', 'SETITEMS'
]))


class _Scan:
  """Follows the unpickler's stack and memo through the opcodes, without making any object."""

  def __init__(self, path: str, size: int, bounds: Bounds, names: FrozenSet[Tuple[str, str]]):
    self.path, self.size, self.names = path, size, names
    self.max_nesting, self.max_objects, self.max_stack = bounds
    self.stack: List[Any] = []  # _Node, or the str of a string opcode
    self.marks: List[List[Any]] = []
    self.memo: List[Any] = []  # a list: 8 bytes an entry (MEMOIZE is one byte of pickle)
    self.objects = self.height = 0

  def refuse(self, reason: str):
    raise unsafe(self.path, f'its pickle {reason}')

  def push(self, item):
    self.height += 1
    if self.height > self.max_stack:
      self.refuse(f'holds more than {self.max_stack} items on its stack at once (MAX_STACK)')
    self.stack.append(item)

  def pop(self):
    if not self.stack:
      self.refuse('takes an item its stack does not have')
    self.height -= 1
    return self.stack.pop()

  def top(self, kinds, what: str) -> _Node:
    """The object an opcode changes: one of `kinds`, not yet inside another object."""
    if not self.stack:
      self.refuse(f'applies {what} to nothing')
    item = self.stack[-1]
    if not isinstance(item, _Node) or item.kind not in kinds:
      self.refuse(f'applies {what} to {_describe(item)}')
    if item.inside:
      self.refuse(f'changes an object ({what}) after putting it into another')
    return item

  def pop_mark(self) -> List[Any]:
    if not self.marks:
      self.refuse('takes items up to a MARK that it has not set')
    items, self.stack = self.stack, self.marks.pop()
    self.height -= len(items) + 1
    return items

  def make(self, kind: str, children, name=None) -> _Node:
    """A new object holding `children` (which may not change from now on)."""
    depth = 0
    for child in children:
      if isinstance(child, _Node):
        child.inside = True
        depth = max(depth, child.depth)
    self.objects += 1
    if self.objects > self.max_objects:
      self.refuse(f'makes more than {self.max_objects} objects (MAX_OBJECTS)')
    return self.deepen(_Node(kind, 1, name), depth + 1)

  def deepen(self, node: _Node, depth: int) -> _Node:
    node.depth = max(node.depth, depth)
    if node.depth > self.max_nesting:
      self.refuse(f'nests objects more than {self.max_nesting} deep (MAX_NESTING)')
    return node

  def add(self, node: _Node, children):
    for child in children:
      if isinstance(child, _Node):
        child.inside = True
        self.deepen(node, child.depth + 1)

  def check_name(self, module, name):
    if (module, name) not in self.names:
      raise refused_name(self.path, module, name)

  def step(self, op: str, arg, pos: int):  # pylint: disable=too-many-branches
    if op not in _OPCODES:
      self.refuse(f'has opcode {op} (at byte {pos})')
    if op in _SCALARS:
      self.push(_SCALAR)
    elif op in _STRINGS:
      self.push(arg)
    elif op in _PUTS:
      if not self.stack:
        self.refuse('memoizes an item its stack does not have')
      index = len(self.memo) if op == 'MEMOIZE' else arg
      if index > len(self.memo):  # Python's pickler numbers them 0, 1, 2, ...
        self.refuse(f'memoizes at index {index} after {len(self.memo)} items')
      if index == len(self.memo):
        self.memo.append(self.stack[-1])
      else:
        self.memo[index] = self.stack[-1]
    elif op in _GETS:
      if arg >= len(self.memo):
        self.refuse(f'reads memo index {arg}, which it has not set')
      self.push(self.memo[arg])
    elif op in _TUPLES:
      items = [self.pop() for _ in range(_TUPLES[op])]
      self.push(self.make('tuple', items))
    elif op == 'MARK':
      self.height += 1
      if self.height > self.max_stack:
        self.refuse(f'holds more than {self.max_stack} items on its stack at once (MAX_STACK)')
      self.marks.append(self.stack)
      self.stack = []
    elif op == 'TUPLE':
      self.push(self.make('tuple', self.pop_mark()))
    elif op == 'EMPTY_TUPLE':
      self.push(self.make('tuple', ()))
    elif op == 'EMPTY_LIST':
      self.push(self.make('list', ()))
    elif op == 'EMPTY_DICT':
      self.push(self.make('dict', ()))
    elif op == 'APPEND':
      value = self.pop()
      self.add(self.top(('list',), 'APPEND'), [value])
    elif op == 'APPENDS':
      items = self.pop_mark()
      self.add(self.top(('list',), 'APPENDS'), items)
    elif op in ('SETITEM', 'SETITEMS'):
      items = self.pop_mark() if op == 'SETITEMS' else [self.pop(), self.pop()]
      if len(items) % 2:
        self.refuse('has a SETITEMS with a key but no value')
      self.add(self.top(('dict', 'ordered_dict'), op), items)
    elif op == 'GLOBAL':
      module, _, name = arg.partition(' ')
      self.check_name(module, name)
      self.push(self.make('global', (), (module, name)))
    elif op == 'STACK_GLOBAL':
      name, module = self.pop(), self.pop()
      if not isinstance(module, str) or not isinstance(name, str):
        self.refuse('names a global by something other than two strings')
      self.check_name(module, name)
      self.push(self.make('global', (), (module, name)))
    elif op == 'REDUCE':
      args, function = self.pop(), self.pop()
      if not isinstance(function, _Node) or function.name not in CALLABLES:
        self.refuse(f'calls {_describe(function)}')
      if not isinstance(args, _Node) or args.kind != 'tuple':
        self.refuse(f'calls {".".join(function.name)} with {_describe(args)} as its arguments')
      kind = 'ordered_dict' if function.name == ORDERED_DICT else 'tensor'
      self.push(self.make(kind, [args]))
    elif op == 'BUILD':
      state = self.pop()
      target = self.top(('ordered_dict',), 'BUILD (setting attributes)')
      if not isinstance(state, _Node) or state.kind != 'dict':
        self.refuse(f'sets the attributes of an OrderedDict from {_describe(state)}')
      self.add(target, [state])
    elif op == 'BINPERSID':
      self.push(self.make('storage', [self.pop()]))
    elif op == 'PROTO':
      if pos != 0 or arg not in (2, 3, 4, 5):
        self.refuse(f'declares protocol {arg} at byte {pos}')
    elif op == 'FRAME':
      if pos + 9 + arg > self.size:
        self.refuse(f'has a frame of {arg} bytes past its end')
    elif op == 'STOP':
      if self.marks or len(self.stack) != 1:
        self.refuse(f'ends with {len(self.stack)} items on its stack and {len(self.marks)} marks')
      if pos != self.size - 1:
        self.refuse(f'has {self.size - 1 - pos} bytes after its end')


def _describe(item) -> str:
  if isinstance(item, str):
    return f'the string {item[:40]!r}'
  if not isinstance(item, _Node):
    return 'a number, bool, None or bytes'
  if item.kind == 'global':
    return '.'.join(item.name)
  return 'an OrderedDict' if item.kind == 'ordered_dict' else f'a {item.kind}'


def check_pickle(data: bytes, path: str, bounds: Bounds, names: FrozenSet[Tuple[str, str]]) -> None:
  """Raises UnsafePickleError for a pickle outside bounds (MAX_NESTING, MAX_OBJECTS, MAX_STACK
  of pth_files.py) or naming anything but names, before anything in it is made: pickletools.genops only parses (it reads each opcode's argument, each string within the
  pickle's bytes), and _Scan follows the stack."""
  scan = _Scan(path, len(data), bounds, names)
  stopped = False
  try:
    for opcode, arg, pos in pickletools.genops(data):
      scan.step(opcode.name, arg, pos)
      stopped = opcode.name == 'STOP'
  except ValueError as e:  # genops: an unknown opcode, or an argument past the end
    if isinstance(e, PthFileError):
      raise
    raise damaged(path, f'its pickle is malformed ({str(e)[:200]})') from e
  if not stopped:
    raise damaged(path, 'its pickle does not end')
