#!/usr/bin/env python
"""Write the corpus of good and bad images and captions that tests/test_image_import.py reads.

    python tests/make_bad_images.py   # rewrites tests/bad_images/

`folder/` captions images with .txt side files: five good images (one in a subfolder, one whose
name needs sanitizing, one JPEG with a [trigger] token) beside one bad file per kind of problem,
a stray README.md and a caption without an image. `meta/` captions images with a metadata.jsonl
whose rows go wrong in every way a row can. Every image is a tiny, distinct picture (32-64 px),
so the corpus stays a few kilobytes.
"""
import io, json, shutil
from pathlib import Path
from PIL import Image, ImageDraw

ROOT = Path(__file__).parent/'bad_images'

def img(path, size=(48, 32), color=(200, 30, 30), fmt=None, caption=None, encoding='utf-8'):
    "A tiny picture with a white square (so no two colours give the same bytes), and its caption side file"
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new('RGB', size, color)
    ImageDraw.Draw(im).rectangle((4, 4, size[0] // 2, size[1] // 2), fill='white')
    im.save(path, fmt)
    if caption is not None: path.with_suffix('.txt').write_bytes(caption.encode(encoding))
    return path

def folder(d):
    img(d/'good_png.png', caption='a red square on white')
    img(d/'good_jpg.jpg', (32, 48), (30, 30, 200), caption='a photo of [trigger] in the snow')
    img(d/'good_webp.webp', (64, 64), (30, 160, 30), caption='a green square')
    img(d/'nested'/'good_nested.png', (40, 40), (20, 20, 120), caption='a navy square')
    img(d/'Good Space.JPG', (64, 40), (220, 200, 20), 'JPEG', caption='ohwx, a yellow square')
    (d/'zero_bytes.png').write_bytes(b''); (d/'zero_bytes.txt').write_text('nothing')
    (d/'not_an_image.png').write_text('<html>404 Not Found</html>'); (d/'not_an_image.txt').write_text('a page')
    whole = io.BytesIO(); Image.effect_noise((64, 64), 60).convert('RGB').save(whole, 'JPEG')
    (d/'truncated.jpg').write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2]); (d/'truncated.txt').write_text('half a photo')
    img(d/'gif_named_png.png', color=(90, 90, 90), fmt='GIF', caption='a gif in disguise')
    img(d/'animation.gif', color=(60, 60, 60), caption='a gif')
    (d/'photo.heic').write_bytes(b'\x00\x00\x00\x18ftypheic'); (d/'photo.txt').write_text('a phone photo')
    img(d/'no_caption.png', color=(10, 200, 200))
    img(d/'empty_caption.png', color=(200, 10, 200), caption=' \n')
    img(d/'latin1_caption.png', color=(120, 60, 0), caption='un café', encoding='latin-1')
    img(d/'too_small.png', (12, 12), (0, 0, 0), caption='a tiny square')
    shutil.copy(d/'good_png.png', d/'good_png_copy.png'); (d/'good_png_copy.txt').write_text('the same picture again')
    (d/'README.md').write_text('Shot on a Tuesday.\n')
    (d/'orphan.txt').write_text('a caption whose image was renamed')
    (d/'.DS_Store').write_bytes(b'\x00\x00\x00\x01Bud1')

def meta(d):
    for n, c in (('a.png', (200, 0, 0)), ('b.png', (0, 200, 0)), ('c.png', (0, 0, 200)), ('d.png', (200, 200, 0)), ('e.png', (0, 200, 200))):
        img(d/n, color=c)
    rows = [{'file_name': 'a.png', 'text': 'a red square'}, {'file_name': 'b.png', 'text': ' '},
            {'file_name': 'gone.png', 'text': 'a file that is not there'}, {'file_name': 'c.png', 'text': 'one'},
            {'file_name': 'c.png', 'text': 'two'}, {'file_name': 'e.png', 'text': 7}]
    (d/'metadata.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))

if __name__ == '__main__':
    shutil.rmtree(ROOT, ignore_errors=True)
    folder(ROOT/'folder'); meta(ROOT/'meta')
    print(f'{sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())} bytes in {ROOT}')
