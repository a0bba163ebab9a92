import torch
from torch import nn

from aecore.host_values import fill_buffer, host_value


def counted(module):
    reads = []

    def cast(buffer):
        reads.append(1)
        return int(buffer)

    return lambda: host_value(module, "count", cast), reads


def test_a_buffer_is_read_again_only_when_it_changed():
    module = nn.Module()
    module.register_buffer("count", torch.tensor(3))
    value, reads = counted(module)
    assert (value(), value(), len(reads)) == (3, 3, 1)
    module.count.add_(2)  # in place: a new version
    assert (value(), len(reads)) == (5, 2)
    module.count = torch.tensor(7)  # a new tensor
    assert (value(), len(reads)) == (7, 3)
    module.load_state_dict({"count": torch.tensor(9)})
    assert (value(), len(reads)) == (9, 4)


def test_a_filled_value_is_served_without_a_read_until_the_buffer_changes_again():
    module = nn.Module()
    module.register_buffer("count", torch.tensor(0))
    value, reads = counted(module)
    fill_buffer(module, "count", 1)
    assert (value(), len(reads)) == (1, 0)
    module.count.add_(1)  # changed after the note
    assert (value(), len(reads)) == (2, 1)


def test_inference_tensors_are_always_read():
    with torch.inference_mode():
        module = nn.Module()
        module.register_buffer("count", torch.tensor(4))
    value, reads = counted(module)
    with torch.inference_mode():
        fill_buffer(module, "count", 5)  # no version to trust: not kept
    assert (value(), value(), len(reads)) == (5, 5, 2)


def test_a_copy_of_the_module_reads_its_own_buffers_again():
    # a copied buffer is a new tensor whose version restarts: an entry carried over by
    # deepcopy's or pickle's memo could match it while holding an older value
    import copy
    import pickle

    module = nn.Module()
    module.register_buffer("count", torch.tensor(0))
    fill_buffer(module, "count", 1)
    module.load_state_dict({"count": torch.tensor(0)})  # the cache still holds 1
    for twin in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert host_value(twin, "count", int) == 0
