import errno

import pytest

from moecompress.errors import OutputError
from moecompress.storage.outputs import disk_errors


@pytest.mark.parametrize(
    "code, fix",
    [
        (errno.ENOSPC, "the disk is full; free space"),
        (errno.EDQUOT, "quota is used up"),
        (errno.EFBIG, "lower --max-shard-size or raise the limit"),
        (errno.EACCES, "Permission denied; fix the cause"),
    ],
)
def test_a_failed_write_names_its_cause_and_the_kept_state(code, fix, tmp_path):
    with pytest.raises(OutputError) as info, disk_errors("layer 3", kept=tmp_path / "state"):
        raise OSError(code, "Permission denied" if code == errno.EACCES else "failed")
    message = str(info.value)
    assert message.startswith("could not write layer 3: ") and fix in message and "\n" not in message
    assert f"kept in {tmp_path / 'state'}: rerun the same command" in message
