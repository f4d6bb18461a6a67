"""GPU paths of issue 22 point 9, checked without a GPU (stubs of torch.cuda): a single
process on cuda:N makes it the current device; a PyTorch whose CUDA build needs a newer
driver is named as such, not as "no CUDA GPU"."""
import pytest
import torch

import contsup.train as train_module
from contsup.errors import UsageError
from contsup.train import TrainConfig


class Reached(Exception):
    """The run got past its device set-up (the test stops it there)."""


@pytest.fixture
def two_fake_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))

    def stop(cfg, device, ckpt, data=True):
        calls.append(("set_up_run", device))
        raise Reached
    monkeypatch.setattr(train_module, "set_up_run", stop)
    return calls


@pytest.mark.parametrize("name, calls", [("cuda:1", [torch.device("cuda", 1)]), ("cuda", []), ("cpu", [])])
def test_a_single_process_on_cuda_n_makes_it_the_current_device(tmp_path, two_fake_gpus, name, calls):
    cfg = TrainConfig(dataset="digits8", k=2, epochs=1, out_dir=str(tmp_path / "run"), device=name)
    with pytest.raises(Reached):
        train_module.train(cfg, progress=False)
    # before anything is built on the device (pinned copies, the model, the data)
    assert two_fake_gpus == calls + [("set_up_run", torch.device(name))]


TOO_OLD = ("The NVIDIA driver on your system is too old (found version 12080). Please update your GPU driver by "
           "downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx "
           "Alternatively, go to: https://pytorch.org to install a PyTorch version that has been compiled with "
           "your version of the CUDA driver.")
NO_DRIVER = ("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed a "
             "driver from http://www.nvidia.com/Download/index.aspx")


@pytest.fixture
def cuda_init_fails(monkeypatch):
    def fail_with(message, cuda="13.0"):
        def init():
            raise RuntimeError(message)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "init", init)
        monkeypatch.setattr(torch.version, "cuda", cuda)
        train_module.cuda_unusable_reason.cache_clear()
        train_module._note_unusable_driver.cache_clear()
    yield fail_with
    train_module.cuda_unusable_reason.cache_clear()
    train_module._note_unusable_driver.cache_clear()


def test_a_driver_too_old_for_this_pytorch_is_named(cuda_init_fails):
    cuda_init_fails(TOO_OLD)
    with pytest.raises(UsageError) as e:
        train_module.pick_device("cuda:0")
    assert str(e.value) == ("--device cuda asked for, but this PyTorch's CUDA 13.0 build needs a newer NVIDIA "
                            "driver than the installed one (it supports CUDA 12.8): update the driver or install "
                            "a PyTorch built for its CUDA; use --device cpu or auto")


@pytest.mark.parametrize("message, cuda, reason", [(NO_DRIVER, "13.0", "no CUDA GPU is visible"),
                                                   ("No CUDA GPUs are available", "12.8", "no CUDA GPU is visible"),
                                                   ("", None, "this PyTorch is built without CUDA")])
def test_no_gpu_is_still_no_gpu(cuda_init_fails, message, cuda, reason):
    cuda_init_fails(message, cuda)
    with pytest.raises(UsageError, match=f"^--device cuda asked for, but {reason}; use --device cpu or auto$"):
        train_module.pick_device("cuda")


def test_auto_says_once_that_it_falls_back_to_the_cpu_for_the_driver(cuda_init_fails, capsys):
    cuda_init_fails(TOO_OLD)
    assert train_module.pick_device("auto") == train_module.pick_device("auto") == torch.device("cpu")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("contsup: warning: --device auto trains on the CPU: this "
                                                   "PyTorch's CUDA 13.0 build needs a newer NVIDIA driver"), err
    cuda_init_fails(NO_DRIVER)   # a machine without a GPU: auto is the CPU, nothing to say
    assert train_module.pick_device("auto") == torch.device("cpu") and capsys.readouterr().err == ""
