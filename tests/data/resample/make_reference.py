"""Makes the resampler test data: 0.4 s of espeak-ng speech with a little white noise, 16-bit,
at 16 kHz and 44.1 kHz, and librosa.resample(..., target_sr=24000) of each (soxr HQ, the
package's resampler) as float32 WAV. Run from this directory with a Python that has librosa,
soundfile and numpy, with espeak-ng and sox on PATH (librosa 0.11.0 / soxr 1.1.0 made these)."""
import subprocess
import numpy as np
import soundfile as sf
import librosa

subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", "/tmp/koe-resample-src.wav",
                "The morning light settled over the quiet harbor."], check=True)
rng = np.random.default_rng(0)
for sr in (16000, 44100):
    tmp = f"/tmp/koe-resample-{sr}.wav"
    subprocess.run(["sox", "/tmp/koe-resample-src.wav", "-r", str(sr), tmp, "rate", "-v"], check=True)
    y, _ = sf.read(tmp, dtype="float32")
    start = int(0.5 * sr)
    clip = 0.8 * y[start:start + int(0.4 * sr)] + 0.02 * rng.standard_normal(int(0.4 * sr))
    sf.write(f"clip{sr}.wav", clip, sr, subtype="PCM_16")
    # Read back, so the reference starts from exactly the samples the test reads.
    x, _ = sf.read(f"clip{sr}.wav", dtype="float32")
    sf.write(f"clip{sr}-librosa24k.wav", librosa.resample(x, orig_sr=sr, target_sr=24000), 24000, subtype="FLOAT")
