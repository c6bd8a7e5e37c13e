"""Chat templates that tests write into place with data.chat_template=FILE."""

FAILING_TEMPLATE = (  # the tiny ChatML template, refusing any message that says FAIL
    "{%- for message in messages -%}"
    "{%- if 'FAIL' in message['content'] -%}{{ raise_exception('cannot render FAIL') }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
