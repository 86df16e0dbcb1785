/* test_template.c — the chat template renderer (engine/jinja.c, jinja_run.c)
 * and eng_chat (engine/chat.c): every construct of the subset, the
 * @huggingface/jinja quirks we reproduce, parse and runtime errors with their
 * positions, the limits, and loading templates from tokenizer_config.json.
 * Whole real templates against @huggingface/jinja itself are
 * tests/js/template_compare.mjs (test chat_template_vs_huggingface). */
#include "internal.h"
#include "jinja.h"
#include "test.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* The context most cases render against. */
#define STD                                                                                                        \
    "{\"messages\": [{\"role\": \"system\", \"content\": \"Sys\"}, {\"role\": \"user\", \"content\": \"Hi there\"}, " \
    "{\"role\": \"assistant\", \"content\": \" Yo\\n\"}], \"d\": {\"b\": 1, \"a\": [1, 2.5, \"x\", null, true], "     \
    "\"c\": {\"k\": \"v\"}}, \"n\": 7, \"f\": 2.5, \"s\": \"Hello World\", \"e\": \"\", \"z\": null, \"t\": true, "   \
    "\"lst\": [3, 1, 2], \"words\": [\"b\", \"A\", \"c\", \"a\"], \"emo\": \"a\xF0\x9F\x98\x80" "b\"}"

typedef struct {
    const char *tpl, *ctx, *want; /* want: the text, or for errors a piece of the message */
    int err;                      /* expected status: 0 = renders */
} tcase;

#define T(tpl, ctx, want) {tpl, ctx, want, 0}
#define E(tpl, ctx, code, piece) {tpl, ctx, piece, code}

/* Parse and render; *rc the first failing status. Returns the text (malloc'd) or NULL. */
static char *render(const char *tpl, const char *ctx, int *rc, char *err, size_t errlen) {
    eng__jinja *t;
    *err = 0;
    if ((*rc = eng__jinja_parse(tpl, strlen(tpl), &t, err, errlen))) return NULL;
    cJSON *j = cJSON_Parse(ctx);
    char *out = NULL;
    size_t len;
    *rc = eng__jinja_render(t, j, &out, &len, err, errlen);
    if (!*rc) CHECK(strlen(out) == len);
    cJSON_Delete(j);
    eng__jinja_free(t);
    return out;
}

static void run_cases(const tcase *cs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        char err[512];
        int rc;
        char *out = render(cs[i].tpl, cs[i].ctx, &rc, err, sizeof err);
        if (!cs[i].err) {
            CHECK_MSG(rc == ENG_OK && !strcmp(out, cs[i].want), "%s\n    want [%s]\n    got  [%s] (%d %s)", cs[i].tpl,
                      cs[i].want, out ? out : "", rc, err);
        } else {
            CHECK_MSG(rc == cs[i].err && strstr(err, cs[i].want), "%s\n    want error %d with [%s]\n    got  %d [%s] [%s]",
                      cs[i].tpl, cs[i].err, cs[i].want, rc, err, out ? out : "");
        }
        free(out);
    }
}
#define RUN(cases) run_cases(cases, sizeof cases / sizeof *cases)

static void test_output(void) {
    static const tcase cs[] = {
        T("plain text", "{}", "plain text"),
        T("{{ 1 }}|{{ 1.0 }}|{{ 2.5 }}|{{ -0.0 }}|{{ 10 / 4 }}|{{ 10 / 5 }}", "{}", "1|1.0|2.5|-0.0|2.5|2.0"),
        T("{{ 0.1 + 0.2 }}|{{ 1 / 3 }}|{{ 2 ** 0.5 }}|{{ 0.000001 }}|{{ 0.0000001 }}", "{}",
          "0.30000000000000004|0.3333333333333333|1.4142135623730951|0.000001|1e-7"),
        T("{{ 123456789012345678901234 }}|{{ 1 / 0 }}|{{ -1 / 0 }}|{{ 0 / 0 }}|{{ 2 ** 70 }}", "{}",
          "1.2345678901234569e+23|Infinity|-Infinity|NaN|1.1805916207174113e+21"),
        T("[{{ none }}][{{ undefined_thing }}][{{ z }}][{{ true }}][{{ False }}][{{ t }}]", STD, "[][][][true][false][true]"),
        T("{{ [1, 2.0, 'a', none, true, x.y] }}", "{}", "[1, 2, \"a\", null, true, undefined]"),
        T("{{ {'a': 1, 'b': [1, {'c': none}]} }}|{{ d }}", STD,
          "{\"a\": 1, \"b\": [1, {\"c\": null}]}|{\"b\": 1, \"a\": [1, 2.5, \"x\", null, true], \"c\": {\"k\": \"v\"}}"),
        T("{{ 'a' 'b' \"c\" }}|{{ 'it\\'s' }}|{{ \"q\\\"q\" }}|{{ 'a\\nb\\tc\\\\d' }}", "{}", "abc|it's|q\"q|a\nb\tc\\d"),
        T("{{ '\\x41\\u00e9\\ud83d\\ude00' }}", "{}", "A\xC3\xA9\xF0\x9F\x98\x80"),
        T("{{ {'a': {'b': 1}} }}", "{}", "{\"a\": {\"b\": 1}}"),
        T("{\"k\": {{ 1 }}}", "{}", "{\"k\": 1}"),
        T("{{ messages[0] }}", STD, "{\"role\": \"system\", \"content\": \"Sys\"}"),
        T("{{ {\"9\": 1, \"a\": 2, \"1\": 3} }}|{{ o }}", "{\"o\": {\"b\": 1, \"2\": 2, \"1\": 3, \"01\": 4}}",
          "{\"9\": 1, \"a\": 2, \"1\": 3}|{\"1\": 3, \"2\": 2, \"b\": 1, \"01\": 4}"),
        E("{{ (1, 2) }}", "{}", ENG_EINVAL, "cannot convert tuple to JSON"),
        E("{% macro m() %}{% endmacro %}{{ m }}", "{}", ENG_EINVAL, "cannot print a function"), /* there: its JavaScript */
    };
    RUN(cs);
}

static void test_whitespace(void) {
    static const tcase cs[] = {
        T("a  {{- 1 -}}  b", "{}", "a1b"),
        T("a\n  {%- if true -%}\n  x\n  {%- endif -%}\n  b", "{}", "axb"),
        T("line1\n  {% if true %}\n  x\n  {% endif %}\nend\n", "{}", "line1\n  x\nend"), /* lstrip_blocks, trim_blocks, last \n */
        T("a {# c #} b|a {#- c -#} b|a\n{# c #}\nb", "{}", "a  b|ab|a\nb"),
        T("x {{ 1 }}\n{{ 2 }}\n", "{}", "x 1\n2"),
        T("trailing\n\n", "{}", "trailing\n"),
        T("a-}\nb\n  {-x|  {-y", "{}", "a-}b\n{-x|  {-y"), /* only at a line start */
        T("{{ 1 }}\r\n  {% if true %}\r\nX{% endif %}", "{}", "1\r\n\r\nX"),
        T("q {% generation %} r {%- endgeneration %} s", "{}", "q  r s"),
        T("q\n  {%- generation -%}  r  {% endgeneration -%}\n s", "{}", "qr  s"),
        T("{%- for x in [1,2] -%}\n  {{ x }}\n{%- endfor -%}", "{}", "12"),
        T("{{-1}}|{{ 5-1 }}|{{ 5 -1 }}|{{ [1,-1] }}|{{ -1.5 }}|{{ (-1) }}", "{}", "1|4|4|[1, -1]|-1.5|-1"), /* {{- strips */
        T("{% set x = {'a': {'b': 1}}%}{{x}}|{{ {'a': 1}}}", "{}", "{\"a\": {\"b\": 1}}|{\"a\": 1}"),
    };
    RUN(cs);
}

static void test_control(void) {
    static const tcase cs[] = {
        T("{% if n > 3 %}big{% elif n > 1 %}mid{% else %}small{% endif %}", STD, "big"),
        T("{% if n > 30 %}big{% elif n > 1 %}mid{% else %}small{% endif %}{% if none %}x{% endif %}", STD, "mid"),
        T("{% for m in messages %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.revindex }}/{{ loop.revindex0 }}/"
          "{{ loop.first }}/{{ loop.last }}/{{ loop.length }}|{% endfor %}",
          STD, "1/0/3/2/true/false/3|2/1/2/1/false/false/3|3/2/1/0/false/true/3|"),
        T("{% for m in messages %}{{ loop.previtem.role if loop.previtem is defined else '-' }}>"
          "{{ loop.nextitem.role if loop.nextitem else '-' }};{% endfor %}",
          STD, "->user;system>assistant;user>-;"),
        T("{% for x in [] %}a{% else %}empty{% endfor %}|{% for x in lst %}{{ x }}{% else %}empty{% endfor %}", STD,
          "empty|312"),
        T("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|{% for k in d %}{{ k }},{% endfor %}", STD,
          "b=1;a=[1, 2.5, \"x\", null, true];c={\"k\": \"v\"};|b,a,c,"),
        T("{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}", "{}", "37"),
        T("{% for x in lst if x > 1 %}{{ x }}:{{ loop.index }}:{{ loop.length }} {% endfor %}", STD, "3:1:2 2:2:2 "),
        T("{% for x in lst %}{% if x == 1 %}{% continue %}{% endif %}{{ x }}{% endfor %}", STD, "32"),
        /* as @huggingface/jinja: the iteration a break or continue ends leaves no text ... */
        T("{% for x in [1, 2, 3] %}{{ x }}{% if x == 2 %}{% break %}{% endif %}{% endfor %}", "{}", "1"),
        /* ... and else runs unless an iteration ran to its end */
        T("{% for x in [1] %}{% break %}{% else %}else{% endfor %}|{% for x in [1, 2] %}{% continue %}{% else %}else{% endfor %}",
          "{}", "else|else"),
        T("{% for x in lst %}{% set acc = x %}{% endfor %}[{{ acc }}]", STD, "[]"),
        T("{% set x = 1 %}{% if true %}{% set x = 2 %}{% endif %}{{ x }}", "{}", "2"),
        E("{% for a, b in [(1, 2)] %}{% endfor %}", "{}", ENG_EINVAL, "cannot unpack tuple"),
        E("{% for a, b in [[1, 2, 3]] %}{% endfor %}", "{}", ENG_EINVAL, "too many items to unpack"),
        E("{% for c in 'abc' %}{% endfor %}", "{}", ENG_EINVAL, "template line 1:13: cannot loop over string"),
        E("{% break %}", "{}", ENG_EINVAL, "outside a loop"),
    };
    RUN(cs);
}

static void test_set_namespace(void) {
    static const tcase cs[] = {
        T("{% set ns = namespace(acc=0) %}{% for x in lst %}{% set ns.acc = ns.acc + x %}{% endfor %}{{ ns.acc }}", STD, "6"),
        T("{% set ns = namespace() %}{{ ns }}{% set ns.a = 1 %}{{ ns }}{{ ns.a }}[{{ ns.b }}]", "{}", "{}{\"a\": 1}1[]"),
        T("{% set ns = namespace(d) %}{{ ns.b }}|{% set ns = namespace([['a', 1], 'bc']) %}{{ ns.a }}{{ ns.b }}", STD, "1|1c"),
        T("{% set ns = namespace(a=1, b=2) %}{{ ns | tojson }}{{ ns is mapping }}[{{ ns.items }}]", "{}",
          "{\"a\": 1, \"b\": 2}false[]"),
        T("{% set a, b = 1, 2 %}{{ a }}{{ b }}|{% set x %}block {{ n }}{% endset %}[{{ x }}]", STD, "12|[block 7]"),
        T("{% set ns = namespace(self=none) %}{% set ns.self = ns %}ok", "{}", "ok"), /* a cycle, freed at the end */
        E("{% set d2 = {'a': 1} %}{% set d2.a = 2 %}", "{}", ENG_EINVAL, "only a namespace's attributes can be set"),
        E("{% set a, b = [1] %}", "{}", ENG_EINVAL, "too few items to unpack"),
        E("{% set ns = namespace(1) %}", "{}", ENG_EINVAL, "not iterable"),
        E("{% set ns = namespace(self=none) %}{% set ns.self = ns %}{{ ns | tojson }}", "{}", ENG_EINVAL, "nested deeper"),
    };
    RUN(cs);
}

static void test_macros(void) {
    static const tcase cs[] = {
        T("{% macro m(a, b=2, c=n) %}{{ a }}-{{ b }}-{{ c }}{% endmacro %}{{ m(1) }}|{{ m(1, 3) }}|{{ m(1, c=9) }}|"
          "{{ m(b=5, a=4) }}|{{ m() }}",
          STD, "1-2-7|1-3-7|1-2-9|4-5-7|-2-7"),
        T("{% macro m() %}{{ varargs }}{{ kwargs }}{% endmacro %}{{ m(1, 2, k=3) }}|{% macro m2(a) %}{{ kwargs }}{% endmacro %}{{ m2(1) }}",
          "{}", "[1, 2]{\"k\": 3}|{}"),
        /* macros see the caller's variables */
        T("{% macro m() %}{{ n }}{{ inner }}{% endmacro %}{% for inner in [5] %}{{ m() }}{% endfor %}", STD, "75"),
        T("{% macro m(x) %}[{{ caller() }}|{{ caller(x) }}]{% endmacro %}{% call(y) m(3) %}c{{ y }}{% endcall %}", "{}", "[c|c3]"),
        T("{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(5) }}", "{}", "54321"),
        T("{% filter upper %}abc {{ s }}{% endfilter %}|{% filter replace('a', 'b') %}aaa{% endfilter %}", STD,
          "ABC HELLO WORLD|bbb"),
        T("{{ m is callable }}{% macro m() %}{% endmacro %}{{ m is callable }}", "{}", "falsetrue"),
        E("{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}", "{}", ENG_EINVAL, "macro 'm' takes not more than 1 argument(s)"),
        E("{% macro m(a) %}{% endmacro %}{{ m(1, z=2) }}", "{}", ENG_EINVAL, "macro 'm' takes no keyword argument 'z'"),
        E("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{}", ENG_EINVAL, "deeper than"),
        E("{{ n() }}", STD, ENG_EINVAL, "cannot call integer"),
    };
    RUN(cs);
}

static void test_operators(void) {
    static const tcase cs[] = {
        T("{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7.5 % 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 3 * 1.0 }}", "{}",
          "3 -4 1 -1 1.5 1024 0.5 3.0"),
        T("{{ -n }} {{ +n }} {{ - -n }} {{ -f }} {{ not n }} {{ -true }}", STD, "-7 7 7 -2.5 false -1"),
        T("{{ 'x' ~ 1 ~ 1.0 ~ true ~ [1, 'a'] ~ d.c }}|{{ 'x' + 1 }}|{{ 1 + 'x' }}|{{ [1] + [2, 3] }}", STD,
          "x11true1,a[object Map]|x1|1x|[1, 2, 3]"),
        T("{{ 1 == 1.0 }}{{ 1 == '1' }}{{ '' == 0 }}{{ 'abc' == 0 }}{{ true == 1 }}{{ true == '1' }}{{ none == u }}"
          "{{ none == 0 }}{{ [1] == [1] }}{{ [1, 2] == '1,2' }}{{ d == d }}{{ ' 12 ' == 12 }}{{ '0x10' == 16 }}",
          STD, "truetruetruefalsetruetruetruefalsefalsetruetruetruetrue"),
        T("{{ 1 in [1, 2] }}{{ 1.0 in [1] }}{{ '1' in [1] }}{{ 3 not in [1] }}{{ 'ell' in s }}{{ 'b' in d }}{{ 'x' in u }}"
          "{{ 'x' not in u }}",
          STD, "truetruefalsetruetruetruefalsetrue"),
        T("{{ n and s }}|{{ e and s }}|{{ e or 'dflt' }}|{{ [] or 'empty' }}|{{ 0 or none }}", STD, "Hello World||dflt|empty|"),
        T("{{ 'y' if n > 3 else 'n' }}[{{ 'y' if n > 30 }}]{{ 'a' if false else 'b' if false else 'c' }}{{ not n == 7 }}", STD,
          "y[]cfalse"),
        T("{{ 1 < 2.5 }}{{ 2 >= 2 }}{{ 1 != 2 }}{{ 'a' != 'a' }}", "{}", "truetruetruefalse"),
        E("{{ 'a' * 3 }}", "{}", ENG_EINVAL, "unsupported operand types for '*': string and integer"),
        E("{{ 'a' < 'b' }}", "{}", ENG_EINVAL, "unsupported operand types for '<'"),
        E("{{ u + 1 }}", "{}", ENG_EINVAL, "template line 1:6: cannot apply '+' to an undefined value"),
        E("{{ none ~ 'x' }}", "{}", ENG_EINVAL, "cannot apply '~' to none"),
        E("{{ 'x' in none }}", "{}", ENG_EINVAL, "cannot apply 'in' to none"),
    };
    RUN(cs);
}

static void test_members(void) {
    static const tcase cs[] = {
        T("{{ messages[0].role }}|{{ messages[-1]['content'] }}|[{{ messages[5] }}]|{{ d['a'][1] }}|{{ d.a.1 }}|{{ d.a.-1 }}",
          STD, "system| Yo\n|[]|2.5|2.5|true"),
        T("[{{ d.missing }}][{{ u.attr }}][{{ u.a.b }}][{{ none.attr }}][{{ n.attr }}]", STD, "[][][][][]"),
        T("{{ lst.length }} {{ s.length }} {{ emo.length }} {{ s[0] }}{{ s[-1] }}[{{ s[99] }}] {{ emo[3] }}", STD,
          "3 11 4 Hd[] b"),
        T("{{ lst[1:] }}{{ lst[:-1] }}{{ lst[::-1] }}{{ lst[::2] }}{{ lst[-2:] }}{{ lst[5:] }}{{ lst[1:2:0] }}", STD,
          "[1, 2][3, 1][2, 1, 3][3, 2][1, 2][][]"),
        T("{{ s[::-1] }}|{{ s[2:5] }}|{{ emo[::-1] }}|{{ s[-3:] }}", STD, "dlroW olleH|llo|b\xF0\x9F\x98\x80" "a|rld"),
        T("{{ d.get('b') }}|{{ d.get('q') }}|{{ d.get('q', 'dd') }}|{{ d.keys() }}|{{ d.c.values() }}|{{ d.c.items() }}", STD,
          "1||dd|[\"b\", \"a\", \"c\"]|[\"v\"]|[[\"k\", \"v\"]]"),
        T("{{ x.y.z is defined }}{{ d.items is defined }}", "{\"d\": {}}", "falsetrue"),
        E("{{ u[0] }}", "{}", ENG_EINVAL, "a key must be a string, not integer"),
        E("{{ d[0] }}", STD, ENG_EINVAL, "a dict's key must be a string"),
        E("{{ s[none:2] }}", STD, ENG_EINVAL, "slice indexes must be integers"),
        E("{{ lst.append(4) }}", STD, ENG_EINVAL, "cannot call undefined"),
    };
    RUN(cs);
}

static void test_string_methods(void) {
    static const tcase cs[] = {
        T("{{ s.upper() }}|{{ s.lower() }}|{{ s.title() }}|{{ 'hELLO wORLD' | title }}|{{ 'hello' | capitalize }}|"
          "{{ 'hELLO' | capitalize }}",
          STD, "HELLO WORLD|hello world|Hello World|HELLO WORLD|Hello|HELLO"),
        T("{{ 'stra\xC3\x9F\x65 \xEF\xAC\x81' | upper }}|{{ '\xCE\xA3\xCE\x91\xCE\xA3 \xCE\xA3' | lower }}|{{ '\xC4\xB0' | lower }}",
          "{}", "STRASSE FI|\xCF\x83\xCE\xB1\xCF\x82 \xCF\x83|i\xCC\x87"),
        T("{{ 'o\\'neil mc-x 3rd \xC3\xA9lan'.title() }}", "{}", "O'Neil Mc-X 3rd \xC3\xA9Lan"),
        T("[{{ '  \\t a b  \\n'.strip() }}][{{ '  a '.lstrip() }}][{{ '  a '.rstrip() }}][{{ ' a ' | trim }}]", "{}",
          "[a b][a ][  a][a]"),
        /* as @huggingface/jinja: strip's argument is ignored (whitespace goes, nothing else) */
        T("{{ '\\n\\nx\\n'.strip('\\n') }}|{{ 'xxaxx'.strip('x') }}|{{ '\xC2\xA0x\xE3\x80\x80'.strip() }}", "{}", "x|xxaxx|x"),
        T("{{ s.startswith('He') }}{{ s.startswith(('x', 'Hell')) }}{{ s.endswith('ld') }}{{ s.endswith(['a']) }}", STD,
          "truetruetruefalse"),
        T("{{ 'a,b,,c'.split(',') }}{{ 'a,b,,c'.split(',', 1) }}{{ 'a,b,c'.split(',', -2) }}", "{}",
          "[\"a\", \"b\", \"\", \"c\"][\"a\", \"b,,c\"][\"a\", \"b,c\"]"),
        T("{{ '  a  b c '.split() }}{{ '  a  b c '.split(none, 1) }}{{ ''.split() }}{{ ''.split(',') }}", "{}",
          "[\"a\", \"b\", \"c\"][\"a\", \"b c \"][][\"\"]"),
        T("{{ 'x</think>y</think>z'.split('</think>')[-1] }}", "{}", "z"),
        T("{{ 'aaa'.replace('a', 'b') }}|{{ 'aaa'.replace('a', 'b', 2) }}|{{ 'aaa'.replace('a', 'b', count=1) }}|"
          "{{ 'ab'.replace('', '-') }}|{{ 'ab'.replace('', '-', 2) }}|{{ 'aaa'.replace('a', 'b', 0) }}",
          "{}", "bbb|bba|baa|-a-b-|-a-b|aaa"),
        E("{{ 'abc'.split('') }}", "{}", ENG_EINVAL, "empty separator"),
        E("{{ 'a b'.split(maxsplit=1) }}", "{}", ENG_EINVAL, "the separator must be a string or none"),
        E("{{ s.startswith() }}", STD, ENG_EINVAL, "takes at least one argument"),
        E("{{ 'abc'.replace('b') }}", "{}", ENG_EINVAL, "replace() takes at least two arguments"),
        E("{{ 'abc'.format(1) }}", "{}", ENG_EINVAL, "cannot call undefined"),
    };
    RUN(cs);
}

static void test_filters(void) {
    static const tcase cs[] = {
        T("{{ lst | length }}{{ s | length }}{{ d | length }}{{ emo | length }}|{{ lst | first }}{{ lst | last }}", STD,
          "31134|32"),
        T("{{ lst | reverse }}{{ lst | sort }}{{ words | sort }}{{ words | sort(true) }}{{ words | sort(case_sensitive=true) }}",
          STD,
          "[2, 1, 3][1, 2, 3][\"A\", \"a\", \"b\", \"c\"][\"c\", \"b\", \"A\", \"a\"][\"A\", \"a\", \"b\", \"c\"]"),
        T("{{ messages | sort(attribute='role') | map(attribute='role') | join(',') }}", STD, "assistant,system,user"),
        T("{{ lst | join }}|{{ lst | join('-') }}|{{ 'abc' | join('.') }}|{{ [1, none, 2.0, true, [1, 2]] | join('|') }}", STD,
          "312|3-1-2|a.b.c|1||2|true|1,2"),
        T("{{ [1, 1, '1', 2, 1.0] | unique }}|{{ lst | list }}", STD, "[1, \"1\", 2]|[3, 1, 2]"),
        T("{{ lst | string }}|{{ n | string }}|{{ f | string }}|{{ 1.0 | string }}|{{ t | string }}|{{ s | string }}", STD,
          "[3, 1, 2]|7|2.5|1.0|true|Hello World"),
        T("{{ '42abc' | int }}|{{ 'abc' | int }}|{{ '-3' | int }}|{{ 3.7 | int }}|{{ -3.7 | int }}|{{ true | int }}|"
          "{{ '1e3' | int }}|{{ ' 12' | int }}",
          "{}", "42|0|-3|3|-4|1|1|12"),
        T("{{ '3.5x' | float }}|{{ 'x' | float }}|{{ 3 | float }}|{{ '1e3' | float }}|{{ '.5' | float }}", "{}",
          "3.5|0.0|3.0|1000.0|0.5"),
        T("{{ 'x' | int(7) }}|{{ 'x' | int(default=8) }}|{{ 3.7 | int(0) }}|{{ 'x' | float(1.5) }}|{{ -3 | abs }}{{ -2.5 | abs }}",
          "{}", "7|8|3.7|1.5|32.5"),
        T("{{ u | default('dv') }}|[{{ none | default('dv') }}]|[{{ '' | default('dv') }}]|{{ '' | default('dv', true) }}|"
          "{{ 0 | default('z', boolean=true) }}",
          "{}", "dv|[]|[]|dv|z"),
        T("{{ d | tojson }}", STD, "{\"b\": 1, \"a\": [1, 2.5, \"x\", null, true], \"c\": {\"k\": \"v\"}}"),
        T("{{ {'a': [1, {}], 'b': {'c': []}} | tojson(indent=2) }}", "{}",
          "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": {\n    \"c\": []\n  }\n}"),
        T("{{ [1, 2] | tojson(indent=0) }}|{{ d.c | tojson(separators=(',', ':')) }}|{{ [u, none, 1.0, -0.0] | tojson }}", STD,
          "[1, 2]|{\"k\":\"v\"}|[null, null, 1, 0]"),
        T("{{ 'a\\u00e9\xF0\x9F\x98\x80\"\\\\\\n\\x01\\x7f</' | tojson }}|{{ 'a\\u00e9\xF0\x9F\x98\x80\\x7f' | tojson(ensure_ascii=true) }}",
          "{}", "\"a\xC3\xA9\xF0\x9F\x98\x80\\\"\\\\\\n\\u0001\x7f</\"|\"a\\u00e9\\ud83d\\ude00\\u007f\""),
        T("{{ {'b': 1, 'a': 2, 'B': 3, '_x': 4, 'a1': 5, 'A': 6} | tojson(sort_keys=true) }}", "{}",
          "{\"_x\": 4, \"a\": 2, \"A\": 6, \"a1\": 5, \"b\": 1, \"B\": 3}"),
        T("{{ 'a\\nb\\n\\nc' | indent }}|{{ 'a\\nb\\n\\nc' | indent(2, true) }}|{{ 'a\\nb\\n\\nc' | indent(width=1, first=true, blank=true) }}",
          "{}", "a\n    b\n\n    c|  a\n  b\n\n  c| a\n b\n \n c"),
        T("{{ d | items }}|{{ {'b': 2, 'A': 1, 'a': 3} | dictsort }}|{{ {'b': 2, 'a': 3} | dictsort(by='value', reverse=true) }}",
          STD,
          "[[\"b\", 1], [\"a\", [1, 2.5, \"x\", null, true]], [\"c\", {\"k\": \"v\"}]]|[[\"A\", 1], [\"a\", 3], [\"b\", 2]]|"
          "[[\"a\", 3], [\"b\", 2]]"),
        T("{{ messages | selectattr('role', 'equalto', 'user') | list | length }}|"
          "{{ messages | rejectattr('role', 'eq', 'user') | map(attribute='role') | join(',') }}|"
          "{{ messages | selectattr('content') | list | length }}",
          STD, "1|system,assistant|3"),
        T("{{ messages | map(attribute='nope', default='D') | list }}|{{ [d] | map(attribute='a.1') | list }}|"
          "{{ [d] | map(attribute='c.k') | first }}",
          STD, "[\"D\", \"D\", \"D\"]|[2.5]|v"),
        T("{{ s | safe }}|{{ true | string }}{{ true | int }}{{ false | float }}", STD, "Hello World|true10.0"),
        E("{{ [] | first }}", "{}", ENG_EINVAL, "first of an empty list"),
        E("{{ [1, 'a'] | sort }}", "{}", ENG_EINVAL, "cannot compare string with integer"),
        E("{{ u | default }}", "{}", ENG_EINVAL, "cannot apply the filter 'default' to undefined"),
        E("{{ u | length }}", "{}", ENG_EINVAL, "template line 1:6: cannot apply the filter 'length' to undefined"),
        E("{{ s | nosuch }}", STD, ENG_EINVAL, "unknown filter 'nosuch' for a string"),
        E("{{ d | tojson(indent='2') }}", STD, ENG_EINVAL, "indent must be an integer"),
        E("{{ [] | selectattr('x', 'nosuchtest') | list }}", "{}", ENG_EINVAL, "unknown test 'nosuchtest'"),
        E("{{ lst | selectattr('x') | list }}", STD, ENG_EINVAL, "selectattr applies to a list of dicts"),
        E("{{ lst | map('string') | list }}", STD, ENG_EINVAL, "map() without attribute= is not supported"),
    };
    RUN(cs);
}

static void test_tests(void) {
    static const tcase cs[] = {
        T("{{ n is defined }}{{ x is defined }}{{ x is undefined }}{{ z is none }}{{ n is none }}{{ s is string }}{{ n is string }}",
          STD, "truefalsetruetruefalsetruefalse"),
        T("{{ n is number }}{{ f is number }}{{ n is integer }}{{ f is integer }}{{ 1.0 is integer }}{{ t is boolean }}"
          "{{ t is true }}{{ t is false }}{{ 1 is true }}",
          STD, "truetruetruefalsefalsetruetruefalsefalse"),
        /* as @huggingface/jinja: a tuple and a dict are not iterable */
        T("{{ lst is iterable }}{{ s is iterable }}{{ d is iterable }}{{ (1, 2) is iterable }}{{ d is mapping }}"
          "{{ lst is mapping }}{{ lst is sequence }}{{ d is sequence }}{{ s is sequence }}{{ n is sequence }}",
          STD, "truetruefalsefalsetruefalsetruetruetruefalse"),
        T("{{ n is odd }}{{ n is even }}{{ 'abc' is lower }}{{ 'aBc' is lower }}{{ 'ABC' is upper }}{{ n is lower }}"
          "{{ n is not none }}{{ z is not none }}{{ range is callable }}",
          STD, "truefalsetruefalsetruefalsetruefalsetrue"),
        E("{{ f is odd }}", STD, ENG_EINVAL, "the test odd needs an integer"),
        E("{{ n is nosuch }}", STD, ENG_EINVAL, "unknown test 'nosuch'"),
        E("{{ n is divisibleby(3) }}", STD, ENG_EFORMAT, "expected '}}', got '('"),
    };
    RUN(cs);
}

static void test_globals(void) {
    static const tcase cs[] = {
        T("{{ range(3) }}{{ range(1, 4) }}{{ range(5, 0, -2) }}{{ range(0, 1, 0.5) }}", "{}", "[0, 1, 2][1, 2, 3][5, 3, 1][0, 0.5]"),
        T("{{ strftime_now('%%|%Q|%') }}", "{}", "%|%Q|%"),
        E("{{ raise_exception('boom: ' ~ n) }}", STD, ENG_EINVAL, "boom: 7"),
        E("{{ range(0, 1, 0) }}", "{}", ENG_EINVAL, "range() step must not be zero"),
    };
    RUN(cs);
    char err[512];
    int rc;
    char *out = render("{{ raise_exception('Roles must alternate') }}", "{}", &rc, err, sizeof err);
    CHECK(rc == ENG_EINVAL && !out && !strcmp(err, "Roles must alternate")); /* the message as it is */
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    char want[64];
    strftime(want, sizeof want, "%Y-%m-%d %b %B", &tm);
    out = render("{{ strftime_now('%Y-%m-%d %b %B') }}", "{}", &rc, err, sizeof err);
    CHECK_MSG(rc == ENG_OK && !strcmp(out, want), "%s vs %s", out ? out : err, want); /* C locale: English months */
    free(out);
}

static void test_parse_errors(void) {
    static const tcase cs[] = {
        E("{% if x %}", "{}", ENG_EFORMAT, "template line 1:11: {% if %} (line 1:4) is never closed with {% endif %}"),
        E("a\nb {% for x in y %}\n{% if z %}{% endfor %}", "{}", ENG_EFORMAT,
          "template line 3:11: expected {% endif %} to close the {% if %} of line 3:4, not {% endfor %}"),
        E("{{ x", "{}", ENG_EFORMAT, "unexpected end of template inside a tag"),
        E("{{ x }", "{}", ENG_EFORMAT, "template line 1:6: expected '}}', got '}'"),
        E("{{ 'abc }}", "{}", ENG_EFORMAT, "string is never closed"),
        E("{# c", "{}", ENG_EFORMAT, "comment is never closed"),
        E("{% endif %}", "{}", ENG_EFORMAT, "unknown statement"),
        E("line1\n{% raw %}x{% endraw %}", "{}", ENG_EFORMAT, "template line 2:4: unknown statement 'raw'"),
        E("{{ x | }}", "{}", ENG_EFORMAT, "expected a filter name after '|'"),
        E("{{ (1, ) }}", "{}", ENG_EFORMAT, "expected a value, got ')'"),
        E("{{ f(a=1, 2) }}", "{}", ENG_EFORMAT, "a positional argument follows a keyword argument"),
        E("{{ x[] }}", "{}", ENG_EFORMAT, "expected an index or a slice"),
        E("{{ x[1:2:3:4] }}", "{}", ENG_EFORMAT, "a slice has at most 3 parts"),
        E("{% for 1 in x %}{% endfor %}", "{}", ENG_EFORMAT, "template line 1:8: a loop's target must be a name"),
        E("{{ !x }}", "{}", ENG_EFORMAT, "unexpected character '!'"),
        E("{{ 'bad \\q' }}", "{}", ENG_EFORMAT, "unknown escape '\\q'"),
        E("{{ '\\x4' }}", "{}", ENG_EFORMAT, "2 hexadecimal digits expected"),
        E("{{ 1e3 }}", "{}", ENG_EFORMAT, "expected '}}', got 'e3'"),
        E("{% macro m(a, a) %}{% endmacro %}", "{}", ENG_EFORMAT, "duplicate parameter 'a'"),
        E("\xC3(", "{}", ENG_EUTF8, "not valid UTF-8"),
    };
    RUN(cs);
}

/* Depth, size and count limits end in an error, never a crash. */
static void test_limits(void) {
    char err[512];
    int rc;
    size_t depth = 5000; /* parser nesting */
    char *src = malloc(depth * 2 + 16);
    strcpy(src, "{{ ");
    for (size_t i = 0; i < depth; i++) strcat(src, "(");
    strcat(src, "1");
    for (size_t i = 0; i < depth; i++) strcat(src, ")");
    strcat(src, " }}");
    char *out = render(src, "{}", &rc, err, sizeof err);
    CHECK_MSG(rc == ENG_EFORMAT && strstr(err, "nesting deeper than"), "%d %s", rc, err);
    free(src);
    out = render("{% for i in range(1000000) %}{{ 'twenty bytes of text.' }}{% endfor %}", "{}", &rc, err, sizeof err);
    CHECK_MSG(rc == ENG_EINVAL && !out && strstr(err, "text would exceed 16 MiB"), "%d %s", rc, err);
    out = render("{{ range(2000000) | length }}", "{}", &rc, err, sizeof err);
    CHECK_MSG(rc == ENG_EINVAL && strstr(err, "more than 1048576 items"), "%d %s", rc, err);
    out = render("{% set ns = namespace(s='ab') %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "{}", &rc,
                 err, sizeof err);
    CHECK_MSG(rc == ENG_EINVAL && strstr(err, "text would exceed 16 MiB"), "%d %s", rc, err);
    /* a 100000-deep chain of namespaces, built by mutation: freed without recursing */
    out = render("{% set ns = namespace(head=none) %}{% for i in range(100000) %}{% set ns.head = namespace(next=ns.head) %}"
                 "{% endfor %}done",
                 "{}", &rc, err, sizeof err);
    CHECK_MSG(rc == ENG_OK && !strcmp(out, "done"), "%d %s", rc, err);
    free(out);
    out = render("{% macro m(x) %}{{ m([x]) }}{% endmacro %}{{ m(1) }}", "{}", &rc, err, sizeof err);
    CHECK_MSG(rc == ENG_EINVAL && strstr(err, "deeper than"), "%d %s", rc, err);
}

static void test_context(void) {
    static const tcase cs[] = {
        E("x", "[1]", ENG_EINVAL, "the context must be a JSON object"),
        E("x", "{\"range\": 1}", ENG_EINVAL, "the context may not set 'range'"),
        E("x", "{\"s\": \"\xC3(\"}", ENG_EUTF8, "not valid UTF-8"),
        T("{{ big }} {{ neg }} {{ huge * 10 }}", "{\"big\": 12345678901234567890, \"neg\": -0.0, \"huge\": 1.5e300}",
          "12345678901234567000 0 1.5e+301"),
        T("{{ a }}", "{\"a\": 1, \"a\": 2}", "2"),
    };
    RUN(cs);
}

/* ---- eng_chat --------------------------------------------------------------- */
static char tmpdir[64];

static void write_file(const char *name, const char *text) {
    char path[256];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

static void remove_files(void) {
    const char *names[] = {"tokenizer_config.json", "chat_template.jinja", "other.json"};
    char path[256];
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        snprintf(path, sizeof path, "%s/%s", tmpdir, names[i]);
        unlink(path);
    }
}

/* Open tmpdir (or tmpdir/file), expecting code and a piece of the message. */
static eng_chat *open_chat(const char *file, int code, const char *piece) {
    char path[256], err[512] = "";
    snprintf(path, sizeof path, "%s%s%s", tmpdir, file ? "/" : "", file ? file : "");
    eng_chat *c = NULL;
    int rc = eng_chat_open(&c, path, err, sizeof err);
    CHECK_MSG(rc == code && (!piece || strstr(err, piece)), "%s: %d [%s], want %d [%s]", path, rc, err, code, piece ? piece : "");
    return c;
}

static const char CHATML[] =
    "{\"bos_token\": {\"__type\": \"AddedToken\", \"content\": \"<s>\"}, \"eos_token\": \"</s>\", \"chat_template\": "
    "\"{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}\"}";

static void test_chat_open(void) {
    remove_files();
    open_chat(NULL, ENG_EIO, "tokenizer_config.json: No such file");
    write_file("tokenizer_config.json", "{\"bos_token\": \"<s>\"}");
    open_chat(NULL, ENG_EUNSUPPORTED, "tokenizer_config.json has no chat_template");
    write_file("tokenizer_config.json", "{\"chat_template\": null}");
    open_chat(NULL, ENG_EUNSUPPORTED, "has no chat_template");
    write_file("tokenizer_config.json", "{\"chat_template\": \"{% for %}\"}");
    open_chat(NULL, ENG_EFORMAT, "tokenizer_config.json: template line 1:8: expected a value, got '%}'");
    write_file("tokenizer_config.json", "{\"chat_template\": 5}");
    open_chat(NULL, ENG_EFORMAT, "neither a string nor a list");
    write_file("tokenizer_config.json", "{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"x\"}]}");
    open_chat(NULL, ENG_EUNSUPPORTED, "no template named \"default\"");
    write_file("tokenizer_config.json", "not json");
    open_chat(NULL, ENG_EFORMAT, "not a JSON object");
    /* chat_template.jinja beside a config without one */
    write_file("tokenizer_config.json", "{\"eos_token\": \"E\"}");
    write_file("chat_template.jinja", "{{ messages[0].content }}{{ eos_token }}\n");
    eng_chat *c = open_chat(NULL, ENG_OK, NULL);
    eng_chat_msg m = {"user", "hi"};
    char *out, err[512];
    size_t len;
    CHECK(c && eng_chat_render(c, &m, 1, 0, &out, &len, err, sizeof err) == ENG_OK && !strcmp(out, "hiE"));
    if (c) free(out);
    eng_chat_close(c);
    /* the list form, by file name */
    write_file("other.json", "{\"chat_template\": [{\"name\": \"rag\", \"template\": \"R\"}, {\"name\": \"default\", \"template\": \"D\"}]}");
    c = open_chat("other.json", ENG_OK, NULL);
    CHECK(c && eng_chat_render(c, NULL, 0, 1, &out, &len, err, sizeof err) == ENG_OK && !strcmp(out, "D"));
    if (c) free(out);
    eng_chat_close(c);
    remove_files();
}

static void test_chat_render(void) {
    remove_files();
    write_file("tokenizer_config.json", CHATML);
    eng_chat *c = open_chat(NULL, ENG_OK, NULL);
    if (!c) return;
    eng_chat_msg msgs[] = {{"system", "S"}, {"user", "U"}, {"assistant", NULL}};
    char *out, err[512];
    size_t len;
    CHECK(eng_chat_render(c, msgs, 3, 1, &out, &len, err, sizeof err) == ENG_OK &&
          !strcmp(out, "<s><|system|>S</s><|user|>U</s><|assistant|></s><|assistant|>") && len == strlen(out));
    free(out);
    CHECK(eng_chat_render(c, msgs, 2, 0, &out, &len, err, sizeof err) == ENG_OK && !strcmp(out, "<s><|system|>S</s><|user|>U</s>"));
    free(out);
    eng_chat_msg bad = {NULL, "x"};
    CHECK(eng_chat_render(c, &bad, 1, 0, &out, &len, err, sizeof err) == ENG_EINVAL && strstr(err, "message 0 has no role"));
    eng_chat_msg nonutf8 = {"user", "\xFF"};
    CHECK(eng_chat_render(c, &nonutf8, 1, 0, &out, &len, err, sizeof err) == ENG_EUTF8);
    /* the JSON form: given tokens win, missing ones are filled in */
    const char *j = "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}], \"bos_token\": \"B\", \"add_generation_prompt\": true}";
    CHECK(eng_chat_render_json(c, j, strlen(j), &out, &len, err, sizeof err) == ENG_OK && !strcmp(out, "B<|user|>q</s><|assistant|>"));
    free(out);
    const char *bad_json[] = {"{\"messages\": [", "[]", "{\"messages\": [{\"role\": \"user\", \"content\": \"a\\u0000b\"}]}"};
    int codes[] = {ENG_EFORMAT, ENG_EFORMAT, ENG_EUNSUPPORTED};
    for (int i = 0; i < 3; i++)
        CHECK_MSG(eng_chat_render_json(c, bad_json[i], strlen(bad_json[i]), &out, &len, err, sizeof err) == codes[i], "%s: %s",
                  bad_json[i], err);
    eng_chat_close(c);
    remove_files();
}

/* One parsed template rendered from several threads at once gives the same text. */
typedef struct {
    eng_chat *c;
    int ok;
} worker;

static void *render_many(void *arg) {
    worker *w = arg;
    eng_chat_msg msgs[] = {{"user", "one"}, {"assistant", "two"}};
    w->ok = 1;
    for (int i = 0; i < 200; i++) {
        char *out, err[256];
        size_t len;
        if (eng_chat_render(w->c, msgs, 2, 1, &out, &len, err, sizeof err) != ENG_OK ||
            strcmp(out, "<s><|user|>one</s><|assistant|>two</s><|assistant|>"))
            w->ok = 0;
        else free(out);
    }
    return NULL;
}

static void test_chat_threads(void) {
    remove_files();
    write_file("tokenizer_config.json", CHATML);
    eng_chat *c = open_chat(NULL, ENG_OK, NULL);
    if (!c) return;
    pthread_t th[4];
    worker w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (worker){c, 0};
        pthread_create(&th[i], NULL, render_many, &w[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK(w[i].ok);
    }
    eng_chat_close(c);
    remove_files();
}

int main(int argc, char **argv) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kvserve-test-template-XXXXXX");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 1; }
    static const test_case tests[] = {
        {"template_output", test_output},
        {"template_whitespace", test_whitespace},
        {"template_control", test_control},
        {"template_set_namespace", test_set_namespace},
        {"template_macros", test_macros},
        {"template_operators", test_operators},
        {"template_members", test_members},
        {"template_string_methods", test_string_methods},
        {"template_filters", test_filters},
        {"template_tests", test_tests},
        {"template_globals", test_globals},
        {"template_parse_errors", test_parse_errors},
        {"template_limits", test_limits},
        {"template_context", test_context},
        {"chat_open", test_chat_open},
        {"chat_render", test_chat_render},
        {"chat_threads", test_chat_threads},
        {NULL, NULL}};
    int rc = run_tests(tests, argc, argv);
    rmdir(tmpdir);
    return rc;
}
