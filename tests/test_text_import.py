"""A bad text dataset never gets in, and leaves no trace: for every file of `tests/bad_inputs/text/`
(and for a name that would escape the workspace, and a same-name re-import with other content),
`import_text` raises one `InputError` whose message names the file, and the line, row and field
where they apply; and the workspace is byte-identical before and after (the same files with the
same bytes, the same ledger rows of datasets and events). A good import, in contrast, writes a
snapshot that plain `datasets` reads, leaves no scratch files, and is idempotent. And what the LLM
recipe trains on is what `render` shows: on all three template paths (generation markers, prefix
rendering, no template) the batched `tokenize_rows` equals row-by-row encoding, and the tokens it
labels trainable decode to the text `render` marks trainable."""
import hashlib, json, re
from pathlib import Path
import datasets, pytest
from forgenb.core import Workspace, InputError
from forgenb.data.text import import_text, load_rows, list_datasets, delete_dataset, normalize_row, render, tokenize_rows, CAP
from forgenb.data import text as T
from forgenb.test_utils import sample_task, tiny_tokenizer
import forgenb.ledger  # noqa: F401  (adds Workspace.ledger)

CORPUS = Path(__file__).parent/'bad_inputs'/'text'

# file, import_text kwargs, where the (first) problem is, what the message says
CASES = [
    ('malformed_line3.jsonl', {}, dict(line=3, row=2), ["invalid JSON: Expecting ',' delimiter"]),
    ('broken_array.json', {}, dict(line=4), ['invalid JSON', 'column 3']),
    ('misnamed_column.csv', {}, dict(line=1, field='instruction'), ["(is 'instrution' it?)", "columns={'instruction': 'instrution'}"]),
    ('empty.jsonl', {}, {}, ['file is empty']),
    ('whitespace.jsonl', {}, {}, ['only whitespace']),
    ('latin1_line3.csv', {}, dict(line=3), ['byte 0xe9 at column 8 (byte offset 43) is not UTF-8', 'iconv']),
    ('unknown_role.jsonl', {}, dict(line=2, row=1, field='messages[1].role'), ["unknown role 'bot'", 'system, user, assistant, tool']),
    ('empty_assistant.jsonl', {}, dict(line=3, row=2, field='messages[1].content'), ['empty assistant turn']),
    ('ends_with_user.jsonl', {}, dict(line=2, row=1, field='messages[2].role'), ["ends with a 'user' turn"]),
    ('content_number.jsonl', {}, dict(line=2, row=1, field='messages[1].content'), ['must be a string, found a number']),
    ('null_output.json', {}, dict(line=7, row=1, field='output'), ['is missing or null']),
    ('rows.xlsx', {}, {}, ["unsupported file type '.xlsx'", '.jsonl, .json, .csv, .parquet', 'CSV UTF-8']),
    ('notes.txt', {}, {}, ["unsupported file type '.txt'", '.jsonl, .json, .csv, .parquet']),
    ('missing_output.parquet', {}, dict(field='output'), ['closest is alpaca', "needs 'output'"]),
    ('missing_output.parquet', dict(format='alpaca'), dict(field='output'), ["missing column 'output'"]),
    ('too_big.jsonl', dict(max_bytes=100), {}, ['over the 100 B limit', 'max_bytes=']),
    ('extra_field.csv', {}, dict(line=3, row=1), ['5 fields where the header has 3']),
    ('many_problems.jsonl', {}, {}, ['25 problems', f'... and {25 - CAP} more', 'many_problems.jsonl:2: row 1: field \'output\': is empty']),
    ('multiline_empty_output.csv', {}, dict(line=5, row=1, field='output'), ['is empty']),
    ('not_objects.json', {}, {}, ['2 problems', 'not_objects.json:2: row 0: expected an object per row, found a string']),
    ('system_not_first.jsonl', {}, dict(line=1, row=0, field='messages[1].role'), ['a system message may only come first']),
    ('duplicate_header.csv', {}, dict(line=1, field='output'), ["column 'output' appears twice"]),
    ('sharegpt_bad_from.jsonl', {}, dict(line=1, row=0, field='conversations[1].from'), ["unknown role 'bot'", 'human, gpt']),
    ('ambiguous.jsonl', {}, dict(field='format'), ['fit several formats: chat, completion', "format='chat'"]),
    ('unknown_columns.csv', {}, dict(line=1, field='format'), ["format='io', columns={'input': 'question', 'output': 'answer'}"]),
    ('typo_key_row2.jsonl', {}, dict(line=2, row=1, field='output'), ["rename 'ouput' to 'output'"]),
    ('header_only.csv', {}, {}, ['holds no rows']),
    ('unclosed_quote.csv', {}, dict(line=3, row=1), ['a quote opened on this line is never closed']),
    ('a_good_file.jsonl', dict(name='../evil'), dict(field='dataset name'), ["'../evil' is not allowed"]),
    ('a_good_file.jsonl', dict(format='alpacca'), dict(field='format'), ["unknown format 'alpacca'"]),
    ('a_good_file.jsonl', dict(format='io', columns={'input': 'instruction', 'output': 'answer'}), dict(field='answer'),
     ["column 'answer' (mapped to 'output') not found"]),
    ('other_content.jsonl', dict(name='existing'), dict(field='name'), ["dataset 'existing' already exists with different content",
                                                                        "delete_dataset(ws, 'existing')"]),
]

def _sha(p): return hashlib.sha256(p.read_bytes()).hexdigest()

def _state(ws):
    "Every file and folder of the workspace (bytes by hash) and the ledger's datasets and events"
    items = sorted((str(p.relative_to(ws.root)), _sha(p) if p.is_file() else 'dir') for p in ws.root.rglob('*')
                   if not p.name.endswith('-shm'))  # SQLite's shared-memory index changes on reads
    led = ws.ledger
    return items, led.q('SELECT * FROM datasets ORDER BY id'), led.q('SELECT * FROM events ORDER BY id')

def _rows(n, salt=''): return [{'instruction': f'Say {i}{salt}', 'input': '', 'output': f'{i}{salt}'} for i in range(n)]

@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    "A workspace that already holds one dataset, `existing`"
    d = tmp_path_factory.mktemp('files')
    for name, rows in (('a_good_file.jsonl', _rows(4)), ('other_content.jsonl', _rows(4, '!'))):
        (d/name).write_text(''.join(json.dumps(r) + '\n' for r in rows))
    ws = Workspace(tmp_path_factory.mktemp('ws')).ensure()
    import_text(ws, d/'a_good_file.jsonl', name='existing')
    ws.files = d
    return ws

@pytest.mark.parametrize('name,kw,where,says', CASES, ids=[f'{c[0]}{"-" + ",".join(c[1]) if c[1] else ""}' for c in CASES])
def test_bad_input_is_refused_and_leaves_no_trace(ws, name, kw, where, says):
    src = CORPUS/name if (CORPUS/name).exists() else ws.files/name
    before = _state(ws)
    with pytest.raises(InputError) as ei: import_text(ws, src, **kw)
    e, msg = ei.value, str(ei.value)
    first = getattr(e, 'problems', [e])[0]
    if 'name' not in kw: assert name in msg
    for k, v in where.items(): assert getattr(first, k) == v, (k, getattr(first, k), msg)
    if 'line' in where: assert f'{name}:{where["line"]}' in msg
    if 'row' in where: assert f'row {where["row"]}' in msg
    if 'field' in where: assert f"field '{where['field']}'" in msg
    for s in says: assert s in msg, (s, msg)
    assert _state(ws) == before

def test_good_import_roundtrips(tmp_path):
    ws = Workspace(tmp_path/'ws').ensure()
    src = tmp_path/'data.csv'
    src.write_text('question,answer,sys\n"What is\n2+2?",4,Be brief.\nCapital of France?,Paris,\n')
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    had_cache = cache.exists() and sorted(cache.rglob('*'))
    rec = import_text(ws, src, columns={'input': 'question', 'output': 'answer', 'system': 'sys'})
    assert (rec['id'], rec['format'], rec['n_rows']) == ('data', 'io', 2)
    assert list((ws.root/'.tmp').iterdir()) == []
    assert sorted(p.name for p in ws.datasets_dir.iterdir()) == ['data']
    assert (cache.exists() and sorted(cache.rglob('*'))) == had_cache
    plain = datasets.Dataset.from_parquet(str(ws.dataset_dir('data')/'data.parquet'), keep_in_memory=True,
                                          cache_dir=str(tmp_path/'hf'))
    assert plain[0]['messages'] == [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'What is\n2+2?'},
                                    {'role': 'assistant', 'content': '4'}]
    assert load_rows(ws, 'data').to_list() == plain.to_list()
    man = json.loads((ws.dataset_dir('data')/'manifest.json').read_text())
    assert (man['content_hash'], man['format'], man['columns']) == (rec['content_hash'], 'io', ['question', 'answer', 'sys'])
    same = tmp_path/'same.jsonl'
    same.write_text(''.join(json.dumps(r) + '\n' for r in plain.to_list()))
    assert import_text(ws, same, name='data') == rec  # the same rows from another file: the same dataset
    assert [r['id'] for r in list_datasets(ws)] == ['data']
    delete_dataset(ws, 'data')
    assert list(ws.datasets_dir.iterdir()) == [] and list_datasets(ws) == []

def test_concurrent_imports_of_one_name(tmp_path, race):
    "Two threads import different content under one name: one wins, the other is refused, the folder is the winner's"
    ws = Workspace(tmp_path/'ws').ensure()
    srcs = []
    for k in range(2):
        srcs.append(tmp_path/f'{k}.jsonl'); srcs[-1].write_text(''.join(json.dumps(r) + '\n' for r in _rows(50, str(k))))
    out = race(*[lambda s=s: import_text(Workspace(ws.root), s, name='shared') for s in srcs])
    won = [o for o in out if isinstance(o, dict)]
    assert len(won) == 1 and sum(isinstance(o, InputError) for o in out) == 1
    man = json.loads((ws.dataset_dir('shared')/'manifest.json').read_text())
    assert man['content_hash'] == won[0]['content_hash'] == ws.ledger.get_dataset('shared')['content_hash']
    assert [p.name for p in ws.datasets_dir.iterdir()] == ['shared'] and list((ws.root/'.tmp').iterdir()) == []

def test_bom_and_crlf_csv(tmp_path):
    "Excel's CSV UTF-8: a byte-order mark before the header and CRLF line ends"
    src = tmp_path/'excel.csv'
    src.write_bytes('instruction,input,output\r\n"Say\r\ncafé",,café\r\nSay hi,,\r\n'.encode('utf-8-sig'))
    ws = Workspace(tmp_path/'ws').ensure()
    with pytest.raises(InputError) as ei: import_text(ws, src)
    assert (ei.value.line, ei.value.row, ei.value.field) == (4, 1, 'output')
    src.write_bytes('instruction,input,output\r\n"Say\r\ncafé",,café\r\n'.encode('utf-8-sig'))
    assert load_rows(ws, import_text(ws, src)['id'])[0]['messages'][1]['content'] == 'café'

def _paths():
    tok = tiny_tokenizer()
    plain = tiny_tokenizer(); plain.chat_template = re.sub(r'\{%-?\s*(end)?generation\s*-?%\}', '', tok.chat_template)
    bare = tiny_tokenizer(); bare.chat_template = None
    return {'marked': tok, 'prefix': plain, 'fallback': bare}

@pytest.mark.parametrize('how', ['marked', 'prefix', 'fallback'])
def test_tokens_match_render(how):
    tk = _paths()[how]
    assert T._how(tk) == how
    turns = lambda k: [{'role': 'system', 'content': 'Be brief.'}] + [
        {'role': r, 'content': f'{r} turn {j} é'} for j in range(k) for r in ('user', 'assistant')]
    rows = [normalize_row(r) for r in sample_task(40)] + [{'messages': turns(k)} for k in (1, 2, 3)] + [{'text': 'plain text é'}]
    batched = tokenize_rows(rows, tk)
    assert batched == [T._labels(*T._encode(r, tk)[1:3]) for r in rows]
    for r, t in zip(rows, batched):
        trained = tk.decode([i for i, l in zip(t['input_ids'], t['labels']) if l != -100])
        assert trained == ''.join(s for s, f in render(r, tk) if f)
        if r.get('messages'):
            replies = [m['content'] for m in r['messages'] if m['role'] == 'assistant']
            assert all(x in trained for x in replies) and not any(m['content'] in trained for m in r['messages'] if m['role'] != 'assistant')
        short = tokenize_rows([r], tk, max_len=8)[0]
        assert short == {'input_ids': t['input_ids'][:8], 'labels': t['labels'][:8]}
