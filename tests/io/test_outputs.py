import errno

import pytest

from moecompress.errors import OutputError
from moecompress.storage.outputs import disk_errors


@pytest.mark.parametrize(
    "code, fix",
    [
        (errno.ENOSPC, "the disk is full; free space"),
        (errno.EDQUOT, "quota is used up"),
        (errno.EFBIG, "exceed the file-size limit"),
        (errno.EACCES, "Permission denied; fix the cause"),
    ],
)
def test_a_failed_write_names_its_cause_and_the_kept_state(code, fix, tmp_path):
    with pytest.raises(OutputError) as info, disk_errors("layer 3", kept=tmp_path / "state"):
        raise OSError(code, "Permission denied" if code == errno.EACCES else "failed")
    message = str(info.value)
    assert message.startswith("could not write layer 3: ") and fix in message and "\n" not in message
    assert f"kept in {tmp_path / 'state'}: rerun the same command" in message


@pytest.mark.parametrize("sharded", [False, True])
def test_the_file_size_hint_names_the_limit_and_fits_what_was_written(sharded, tmp_path):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, hard))
    try:
        with pytest.raises(OutputError) as info, disk_errors("the checkpoint", sharded=sharded):
            raise OSError(errno.EFBIG, "failed")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "limit of 3000000 bytes (ulimit -f)" in str(info.value)
    assert ("lower --max-shard-size" in str(info.value)) == sharded
